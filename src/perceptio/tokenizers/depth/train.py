"""Training the depth tokenizer on teacher maps, resumably.

Every step draws its batch (and the torch seed for codebook restarts) from ``(seed, step)`` alone, so a run
resumed from a checkpoint continues exactly as an uninterrupted one would. Checkpoints are written to a
temporary folder and renamed, so a killed run never leaves a half-written one; the last ``keep_checkpoints``
are kept. Weights and optimiser state are stored as safetensors, the rest as JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from perceptio.data.errors import DataError
from perceptio.data.readers import read_depth_folder
from perceptio.data.schema import ImageRef, Sample, Task
from perceptio.tokenizers.depth.config import DepthTokenizerConfig
from perceptio.tokenizers.depth.model import DepthTokenizer

__all__ = ["TokenizerTrainConfig", "find_depth_samples", "latest_checkpoint", "train_tokenizer"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """Optimisation settings. Defaults follow AURORA's VQ-VAE: Adam, lr 3e-4, x0.98 every 500 steps, batch 8."""

    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 8
    """Maps per step."""
    lr: float = 3e-4
    """Adam learning rate."""
    lr_decay: float = 0.98
    """Multiply the learning rate by this every ``lr_decay_every`` steps."""
    lr_decay_every: int = 500
    """Steps between learning-rate decays."""
    flip: bool = True
    """Randomly mirror maps left-right."""
    seed: int = 0
    """Seed of batch sampling and codebook restarts."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only the final model)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 10
    """Steps between lines of train_log.jsonl."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr_decay_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenizerTrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1 or self.checkpoint_every < 0:
            raise ValueError("lr must be > 0, lr_decay in (0, 1] and checkpoint_every >= 0")


def find_depth_samples(data: str | Path, *, split: str = "train", image_dir: str | Path | None = None) -> list[Sample]:
    """The samples to train or evaluate on, from any of three kinds of folder.

    * a synthetic world (has ``manifest.json``): ``depth/<split>`` paired with ``images/``;
    * a depth folder (depth maps with a ``depth.json`` sidecar, images in ``image_dir`` or the same folder);
    * a plain folder of images (for a network teacher such as Depth Anything): no depth attached.
    """
    root = Path(data)
    if not root.is_dir():
        raise DataError(
            "data folder not found", path=root, fix="pass --data a synthetic world, a depth folder or an image folder"
        )
    if (root / "manifest.json").is_file():
        folder = root / "depth" / split
        if not folder.is_dir():
            available = sorted(p.name for p in (root / "depth").iterdir()) if (root / "depth").is_dir() else []
            raise DataError(f"the world has no split {split!r}", path=root / "depth", fix=f"use one of {available}")
        return read_depth_folder(folder, image_dir=root / "images", split=split)
    if (root / "depth.json").is_file():
        return read_depth_folder(root, image_dir=image_dir, split=split)
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise DataError(
            "no images and no depth.json sidecar in the folder",
            path=root,
            fix="point --data at a synthetic world, a depth folder with depth.json, or a folder of .png/.jpg images",
        )
    return [
        Sample(sample_id=p.stem, task=Task.DEPTH, source="images", split=split, images=(ImageRef(path=p),))
        for p in images
    ]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir/checkpoints`` (None if there is none)."""
    folder = Path(out_dir) / "checkpoints"
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def _lr_at(config: TokenizerTrainConfig, step: int) -> float:
    return config.lr * config.lr_decay ** (step // config.lr_decay_every)


def _save_checkpoint(
    out_dir: Path, step: int, model: DepthTokenizer, optimizer: torch.optim.Optimizer, keep: int, state: dict
) -> None:
    from safetensors.torch import save_file

    folder = out_dir / "checkpoints"
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    opt_state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, slots in opt_state["state"].items()
        for name, value in slots.items()
    }
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer_groups.json").write_text(json.dumps(opt_state["param_groups"]))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def _load_checkpoint(folder: Path, model: DepthTokenizer, optimizer: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    loaded = DepthTokenizer.from_pretrained(folder, expected=model.config)
    model.load_state_dict(loaded.state_dict())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": json.loads((folder / "optimizer_groups.json").read_text())}
    )
    return int(json.loads((folder / "trainer_state.json").read_text())["step"])


def train_tokenizer(
    maps: np.ndarray,
    model_config: DepthTokenizerConfig,
    train_config: TokenizerTrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    record: dict | None = None,
) -> DepthTokenizer:
    """Train a depth tokenizer on teacher maps and save it to ``out_dir``.

    Args:
        maps: (N, S, S) teacher maps in [0, 1] with S = ``model_config.input_size``.
        model_config: the tokenizer architecture.
        train_config: optimisation settings.
        out_dir: where the final tokenizer (config.json + model.safetensors), ``train_log.jsonl``,
            ``training.json`` and ``checkpoints/`` go.
        resume: continue from the newest checkpoint in ``out_dir`` (error if there is none).
        progress: show a progress bar with loss and codebook usage.
        record: extra JSON-able facts (data, teacher) written into ``training.json``.

    Returns:
        The trained tokenizer, in eval mode.
    """
    out_dir = Path(out_dir)
    size = model_config.input_size
    if maps.ndim != 3 or maps.shape[1:] != (size, size):
        raise ValueError(f"maps must be (N, {size}, {size}), got {maps.shape}")
    if len(maps) == 0:
        raise ValueError("no training maps")
    model = DepthTokenizer(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    start = 0
    log_path = out_dir / "train_log.jsonl"
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}; start without --resume")
        start = _load_checkpoint(checkpoint, model, optimizer)
        logger.info("resumed from %s (step %d)", checkpoint, start)
        if log_path.is_file():  # drop log lines past the checkpoint: they will be written again
            lines = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start]
            log_path.write_text("".join(line + "\n" for line in lines))
    elif latest_checkpoint(out_dir) is not None:
        raise FileExistsError(
            f"{out_dir} already holds checkpoints; pass --resume to continue, or choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(
        json.dumps(
            {"model": model_config.to_dict(), "train": asdict(train_config), "num_maps": len(maps), **(record or {})},
            indent=2,
        )
    )

    data = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    model.train()
    window = np.zeros(model_config.num_codes, dtype=np.int64)
    began = time.perf_counter()
    bar = tqdm(
        range(start, train_config.steps),
        initial=start,
        total=train_config.steps,
        desc="tokenizer",
        disable=not progress,
    )
    with log_path.open("a") as log:
        for step in bar:
            rng = np.random.default_rng([train_config.seed, step])
            index = rng.integers(0, len(data), size=train_config.batch_size)
            batch = data[index]
            if train_config.flip:
                flip = torch.from_numpy(rng.random(train_config.batch_size) < 0.5)
                batch = torch.where(flip[:, None, None], batch.flip(-1), batch)
            torch.manual_seed(train_config.seed * 1_000_003 + step)  # codebook init/restarts, reproducible per step
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(train_config, step)
            output = model(batch)
            if not torch.isfinite(output.loss):  # stop before the bad step touches the weights
                raise FloatingPointError(
                    f"non-finite tokenizer loss at step {step}; lower the learning rate. "
                    f"The last good checkpoint is {latest_checkpoint(out_dir)} (continue with --resume)."
                )
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            window += np.bincount(output.codes.reshape(-1).numpy(), minlength=model_config.num_codes)
            done = step + 1
            if done % train_config.log_every == 0 or done == train_config.steps:
                usage = float((window > 0).mean())
                entry = {
                    "step": done,
                    "loss": output.loss.item(),
                    "reconstruction": output.reconstruction_loss.item(),
                    "commitment": output.commitment_loss.item(),
                    "codebook_usage": usage,
                    "lr": _lr_at(train_config, step),
                }
                log.write(json.dumps(entry) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{entry['loss']:.4f}", usage=f"{100 * usage:.0f}%")
                window[:] = 0
            if (
                train_config.checkpoint_every
                and done % train_config.checkpoint_every == 0
                and done < train_config.steps
            ):
                _save_checkpoint(
                    out_dir,
                    done,
                    model,
                    optimizer,
                    train_config.keep_checkpoints,
                    {"seconds": time.perf_counter() - began},
                )
    model.eval()
    model.save_pretrained(out_dir)
    last = json.loads(log_path.read_text().splitlines()[-1]) if log_path.read_text() else {}
    summary = {
        "steps": train_config.steps,
        "resumed_from": start,
        "seconds_this_run": time.perf_counter() - began,
        "final": last,
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return model
