"""Training the depth tokenizer on teacher maps, resumably.

Every step draws its batch (and the torch seed for codebook restarts) from ``(seed, step)`` alone, so a run
resumed from a checkpoint continues exactly as an uninterrupted one would. Checkpoints are the training
loop's (:mod:`perceptio.utils.checkpoints`, with the codebook's running averages as buffers): written to a
temporary folder and renamed, so a killed run never leaves a half-written one; the last ``keep_checkpoints`` are
kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from perceptio.errors import NonFiniteLossError
from perceptio.tokenizers.depth.config import DepthTokenizerConfig
from perceptio.tokenizers.depth.model import DepthTokenizer
from perceptio.utils.checkpoints import (
    gather_state,
    last_good_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from perceptio.utils.jsonl import read_jsonl
from perceptio.utils.run_folder import require_same_settings
from perceptio.utils.runlock import run_lock

__all__ = ["TokenizerTrainConfig", "latest_checkpoint", "train_tokenizer"]

logger = logging.getLogger(__name__)


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
        if not 0 < self.lr < math.inf or not 0 < self.lr_decay <= 1 or self.checkpoint_every < 0:
            raise ValueError("lr must be finite and > 0, lr_decay in (0, 1] and checkpoint_every >= 0")


def _lr_at(config: TokenizerTrainConfig, step: int) -> float:
    return config.lr * config.lr_decay ** (step // config.lr_decay_every)


def _data_digest(maps: np.ndarray, valid: np.ndarray | None) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(maps, dtype=np.float32).tobytes())
    if valid is not None:
        digest.update(np.packbits(valid).tobytes())
    return digest.hexdigest()[:16]


def _check_resumable(
    state: dict, model_config: DepthTokenizerConfig, train_config: TokenizerTrainConfig, digest: str, folder: Path
) -> None:
    """Refuse to resume a checkpoint with other settings or data: the run would silently differ."""
    require_same_settings(
        folder,
        {"model": state.get("model_config", {}), "train": state.get("train_config", {})},
        {"model": model_config.to_dict(), "train": asdict(train_config)},
        may_change=("train.steps", "train.lr"),  # a lower lr is the fix after a non-finite loss
        only_saved=True,
        fix="Use the original ones",
    )
    if state.get("data_digest") not in (None, digest):
        raise ValueError(
            f"{folder}: the training maps differ from the checkpoint's (data digest {state['data_digest']} vs "
            f"{digest}); resume with the same data, split and teacher"
        )


def train_tokenizer(
    maps: np.ndarray,
    model_config: DepthTokenizerConfig,
    train_config: TokenizerTrainConfig,
    out_dir: str | Path,
    *,
    valid: np.ndarray | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    record: dict | None = None,
) -> DepthTokenizer:
    """Train a depth tokenizer on teacher maps and save it to ``out_dir``.

    Args:
        maps: (N, S, S) teacher maps in [0, 1] with S = ``model_config.input_size``.
        valid: optional bool (N, S, S): pixels with a measurement (the loss ignores the others).
        device: where to train (``cpu``, ``cuda``).
        model_config: the tokenizer architecture.
        train_config: optimisation settings.
        out_dir: where the final tokenizer (config.json + model.safetensors), ``train_log.jsonl``,
            ``training.json`` and ``checkpoints/`` go.
        resume: continue from the newest checkpoint in ``out_dir`` (error if there is none).
        progress: show a progress bar with loss and codebook usage.
        record: extra JSON-able facts (data, teacher) written into ``training.json``.

    Returns:
        The trained tokenizer, in eval mode.

    Raises:
        RunFolderLockedError: another process writes into ``out_dir``.
    """
    with run_lock(out_dir, "tokenizer training"):
        return _train_tokenizer(
            maps,
            model_config,
            train_config,
            Path(out_dir),
            valid=valid,
            device=device,
            resume=resume,
            progress=progress,
            record=record,
        )


def _train_tokenizer(
    maps: np.ndarray,
    model_config: DepthTokenizerConfig,
    train_config: TokenizerTrainConfig,
    out_dir: Path,
    *,
    valid: np.ndarray | None,
    device: str,
    resume: bool,
    progress: bool,
    record: dict | None,
) -> DepthTokenizer:
    size = model_config.input_size
    if maps.ndim != 3 or maps.shape[1:] != (size, size):
        raise ValueError(f"maps must be (N, {size}, {size}), got {maps.shape}")
    if len(maps) == 0:
        raise ValueError("no training maps")
    if valid is not None and valid.shape != maps.shape:
        raise ValueError(f"valid must have the shape of maps {maps.shape}, got {valid.shape}")
    torch.manual_seed(train_config.seed)  # the initial weights, so two fresh runs with one seed are identical
    model = DepthTokenizer(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr, foreach=True)  # bit-identical, fewer calls
    start = 0
    window = np.zeros(model_config.num_codes, dtype=np.int64)  # codes seen since the last log line
    digest = _data_digest(maps, valid)
    log_path = out_dir / "train_log.jsonl"
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}; start without --resume")
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        _check_resumable(state, model_config, train_config, digest, checkpoint)
        load_checkpoint(checkpoint, model, optimizer, buffers=True)
        start = int(state["step"])
        window[:] = state.get("usage_window", window)
        logger.info("resumed from %s (step %d)", checkpoint, start)
        if log_path.is_file():  # drop log lines past the checkpoint (and one cut short): they are written again
            kept = [line for line in read_jsonl(log_path) if line.get("step", start + 1) <= start]
            log_path.write_text("".join(json.dumps(line) + "\n" for line in kept))
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
    masks = torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)) if valid is not None else None
    model.train()
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
            batch_valid = masks[index] if masks is not None else None
            if train_config.flip:
                flip = torch.from_numpy(rng.random(train_config.batch_size) < 0.5)[:, None, None]
                batch = torch.where(flip, batch.flip(-1), batch)
                if batch_valid is not None:
                    batch_valid = torch.where(flip, batch_valid.flip(-1), batch_valid)
            batch = batch.to(device)
            batch_valid = batch_valid.to(device) if batch_valid is not None else None
            torch.manual_seed(train_config.seed * 1_000_003 + step)  # codebook init/restarts, reproducible per step
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(train_config, step)
            output = model(batch, batch_valid)
            if not torch.isfinite(output.loss):  # stop before the bad step touches the weights
                good = last_good_checkpoint(out_dir, step)
                raise NonFiniteLossError(
                    f"non-finite tokenizer loss at step {step}; lower the learning rate (--lr), then "
                    + (
                        f"continue from the last good checkpoint, {good}, with --resume"
                        if good
                        else "start again (no good checkpoint was written yet)"
                    )
                )
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            window += np.bincount(output.codes.reshape(-1).cpu().numpy(), minlength=model_config.num_codes)
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
                state = {
                    "model_config": model_config.to_dict(),
                    "train_config": asdict(train_config),
                    "data_digest": digest,
                    "usage_window": window.tolist(),
                    "seconds": time.perf_counter() - began,
                }
                weights, optim = gather_state(model, optimizer, buffers=True)
                save_checkpoint(out_dir, done, weights, optim, state, keep=train_config.keep_checkpoints)
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
