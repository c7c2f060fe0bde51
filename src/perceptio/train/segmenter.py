"""Pretraining a SAM2 segmenter with point and box prompts, and the point-prompted reference cIoU.

Perceptio starts from a pretrained SAM2 whose image encoder stays frozen. The real SAM2.1 weights cannot be
downloaded here, so for the tiny preset this module trains one on object masks (the synthetic world's RefCOCO
annotations): each step draws objects, prompts SAM2 with one positive point inside the object (half the time)
or with its bounding box, and trains encoder and decoder with the mask losses of the model (BCE + Dice) on the
low-resolution masks. It checkpoints and resumes like the other trainers (:mod:`perceptio.utils.checkpoints`).
:func:`point_prompt_ciou` then scores the same SAM2 prompted with a true point inside each object: the reference
that the segmentation-token pathway can at best reach.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Sam2Config, Sam2Model

from perceptio.data.schema import Sample
from perceptio.errors import NonFiniteLossError
from perceptio.eval.metrics import SegmentationMeter
from perceptio.losses import mask_bce_loss, mask_dice_loss
from perceptio.models.processing import IMAGENET_MEAN, IMAGENET_STD
from perceptio.models.sam2 import without_stability_swap
from perceptio.train.config import SegmenterPretrainConfig
from perceptio.utils.checkpoints import (
    gather_state,
    last_good_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from perceptio.utils.run_folder import require_same_settings
from perceptio.utils.runlock import run_lock
from perceptio.utils.weights_files import with_user_umask

__all__ = [
    "SegmenterPretrainConfig",
    "load_objects",
    "point_prompt_ciou",
    "preset_segmenter_config",
    "pretrain_on_refer",
    "pretrain_segmenter",
]


#: Settings that may change between a checkpoint and its resumption (they do not change the trajectory).
_RESUMABLE_CHANGES = ("checkpoint_every", "keep_checkpoints", "lr")  # a lower lr: the fix for a non-finite loss


@dataclass
class _Objects:
    """Every distinct (image, object mask) pair, preprocessed: SAM2 pixels, full-size masks, prompts."""

    pixels: torch.Tensor  # (I, 3, S, S) SAM2 inputs, one per image
    image_index: np.ndarray  # (N,) which image each object is in
    masks: list[np.ndarray]  # N bool (H, W) at the original size
    points: np.ndarray  # (N, 2) x, y of the object's most interior pixel, in SAM2 input coordinates
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 in SAM2 input coordinates


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel farthest from the mask's border (a point surely inside the object), by repeated erosion.

    The erosion runs on the mask's bounding box with one background pixel around it where the image has one
    (the image's own edge otherwise), which erodes exactly as the whole image does, in a fraction of the time."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, mask.shape[0])
    x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, mask.shape[1])
    x, y = _eroded_centre(mask[y0:y1, x0:x1])
    return x + x0, y + y0


def _eroded_centre(mask: np.ndarray) -> tuple[float, float]:
    current = mask.copy()
    while True:
        shrunk = current.copy()
        shrunk[1:] &= current[:-1]
        shrunk[:-1] &= current[1:]
        shrunk[:, 1:] &= current[:, :-1]
        shrunk[:, :-1] &= current[:, 1:]
        if not shrunk.any() or np.array_equal(shrunk, current):  # a mask that fills the image never shrinks
            break
        current = shrunk
    ys, xs = np.nonzero(current)
    k = len(ys) // 2
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def load_objects(samples: Sequence[Sample], size: int, *, distinct: bool = True) -> _Objects:
    """The objects of referring-segmentation samples: one per annotation (``distinct``) or one per sample (as the
    referring-segmentation metric weighs them); samples without a mask are skipped."""
    images: dict[str, int] = {}
    pixels: list[torch.Tensor] = []
    index, masks, points, boxes = [], [], [], []
    seen: set[tuple[str, str]] = set()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for sample in samples:
        key = sample.image.describe()
        ann = (key, str(sample.meta.get("ann_id", sample.sample_id)))
        if (distinct and ann in seen) or not sample.masks:
            continue
        seen.add(ann)
        mask = sample.target_mask().astype(bool)
        if not mask.any():
            continue
        if key not in images:
            image = sample.image.load()
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            resized = F.interpolate(array[None], size=(size, size), mode="bilinear", align_corners=False)[0]
            images[key] = len(pixels)
            pixels.append((resized - mean) / std)
        h, w = mask.shape
        sx, sy = size / w, size / h
        x, y = _interior_point(mask)
        ys, xs = np.nonzero(mask)
        index.append(images[key])
        masks.append(mask)
        points.append((x * sx, y * sy))
        boxes.append((xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy))
    if not masks:
        raise ValueError("no object masks among the samples; pass referring-segmentation samples with masks")
    return _Objects(
        torch.stack(pixels), np.array(index), masks, np.array(points, np.float32), np.array(boxes, np.float32)
    )


def _prompted(sam: Sam2Model, pixels: torch.Tensor, points: torch.Tensor | None, boxes: torch.Tensor | None):  # noqa: ANN202
    if boxes is not None:
        return sam(pixel_values=pixels, input_boxes=boxes[:, None], multimask_output=False)
    labels = torch.ones(points.shape[0], 1, 1, dtype=torch.long)
    return sam(pixel_values=pixels, input_points=points[:, None, None], input_labels=labels, multimask_output=False)


def pretrain_segmenter(
    objects: _Objects,
    sam_config: Sam2Config,
    config: SegmenterPretrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
) -> Sam2Model:
    """Train a SAM2 of ``sam_config`` from random weights on ``objects``; save it (``save_pretrained``) to
    ``out_dir``.

    Checkpoints (``out_dir/checkpoints``, every ``config.checkpoint_every`` steps) hold the weights, AdamW's
    moments and the random generators' states, so ``resume=True`` continues exactly as the uninterrupted run.

    Raises:
        FileExistsError: ``out_dir`` holds checkpoints and ``resume`` is False.
        RunFolderLockedError: another process writes into ``out_dir``.
    """
    with run_lock(out_dir, "segmenter pretraining"):
        return _pretrain_segmenter(objects, sam_config, config, Path(out_dir), progress=progress, resume=resume)


def _objects_digest(objects: _Objects) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(objects.points).tobytes())
    digest.update(np.ascontiguousarray(objects.image_index).tobytes())
    return digest.hexdigest()[:16]


def _pretrain_segmenter(
    objects: _Objects,
    sam_config: Sam2Config,
    config: SegmenterPretrainConfig,
    out_dir: Path,
    *,
    progress: bool,
    resume: bool,
) -> Sam2Model:
    torch.manual_seed(config.seed)
    sam = without_stability_swap(Sam2Model(sam_config))
    # foreach: the same updates as the per-tensor loop, in fewer calls (see perceptio.train.optim)
    optimizer = torch.optim.AdamW(sam.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    rng = np.random.default_rng(config.seed)
    settings = {"config": asdict(config), "objects": _objects_digest(objects)}
    log: list[dict] = []
    start = 0
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}; start without --resume")
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        require_same_settings(
            checkpoint,
            state["settings"],
            settings,
            may_change=[f"config.{key}" for key in _RESUMABLE_CHANGES],
            fix="Resume with the settings and data that wrote the checkpoint, or start again in another folder",
        )
        load_checkpoint(checkpoint, sam, optimizer, buffers=True)
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        start, log = int(state["step"]), state["log"]
    elif latest_checkpoint(out_dir, warn=False) is not None:
        raise FileExistsError(
            f"{out_dir} already holds checkpoints; pass --resume to continue, or choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    sam.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="segmenter", disable=not progress)
    for step in bar:
        lr = config.lr * 0.5 * (1 + np.cos(np.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = rng.integers(0, len(objects.masks), size=config.batch_size)
        use_box = rng.random() < config.box_fraction  # one prompt kind per batch
        pixels = objects.pixels[objects.image_index[chosen]]
        prompt = torch.from_numpy(objects.boxes[chosen] if use_box else objects.points[chosen])
        out = _prompted(sam, pixels, None if use_box else prompt, prompt if use_box else None)
        logits = out.pred_masks[:, 0, 0]  # (B, h, w)
        targets = torch.stack(
            [
                F.interpolate(
                    torch.from_numpy(objects.masks[k])[None, None].float(), size=logits.shape[-2:], mode="area"
                )[0, 0]
                for k in chosen
            ]
        )
        targets = (targets > 0.5).float()
        loss = 2.0 * mask_bce_loss(logits, targets) + 0.5 * mask_dice_loss(logits, targets)
        if not torch.isfinite(loss):  # stop before the bad step touches the weights
            good = last_good_checkpoint(out_dir, step)
            raise NonFiniteLossError(
                f"non-finite segmenter loss at step {step}; lower the learning rate (--lr), then "
                + (f"continue from {good} with --resume" if good else "start again (no good checkpoint yet)")
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            log.append({"step": done, "loss": loss.item(), "lr": lr})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            weights, optim = gather_state(sam, optimizer, buffers=True)
            state = {
                "settings": settings,
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state().tolist(),
                "log": log,
            }
            save_checkpoint(out_dir, done, weights, optim, state, keep=config.keep_checkpoints)
    sam.eval()
    sam.save_pretrained(out_dir)
    with_user_umask(out_dir)
    summary = {
        "config": asdict(config),
        "objects": len(objects.masks),
        "resumed_from": start,
        "seconds": time.perf_counter() - began,
    }
    (out_dir / "pretraining.json").write_text(json.dumps({**summary, "log": log}, indent=2) + "\n")
    return sam


@torch.no_grad()
def point_prompt_ciou(sam: Sam2Model, objects: _Objects, *, batch_size: int = 64) -> dict[str, float]:
    """cIoU / gIoU of ``sam`` prompted with one true point inside each object, masks compared at the original
    image size (the same metric as the referring-segmentation evaluation)."""
    sam.eval()
    meter = SegmentationMeter()
    for start in range(0, len(objects.masks), batch_size):
        chunk = np.arange(start, min(start + batch_size, len(objects.masks)))
        out = _prompted(sam, objects.pixels[objects.image_index[chunk]], torch.from_numpy(objects.points[chunk]), None)
        logits = out.pred_masks[:, 0, 0]
        for k, index in enumerate(chunk):
            target = objects.masks[index]
            full = F.interpolate(logits[k][None, None], size=target.shape, mode="bilinear", align_corners=False)[0, 0]
            meter.add([full.numpy() > 0], target)
    result = meter.result()
    return {"ciou": result["ciou"], "giou": result["giou"], "objects": result["count"]}


def preset_segmenter_config(preset: str = "tiny") -> Sam2Config:
    """The SAM2 configuration of a random-weight model preset (the architecture to pretrain)."""
    from perceptio.models import PRESETS

    if preset not in PRESETS or PRESETS[preset].config is None:
        raise ValueError(f"preset {preset!r} has no segmenter config to pretrain; use tiny")
    return PRESETS[preset].config(PRESETS[preset].text_tokenizer()).segmenter_config


def pretrain_on_refer(
    root: str | Path,
    out_dir: str | Path,
    config: SegmenterPretrainConfig,
    *,
    preset: str = "tiny",
    image_root: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, float]:
    """Pretrain a preset's SAM2 on the train split of a refer root (e.g. a synthetic world), save it to
    ``out_dir`` and add its point-prompted cIoU / gIoU on the val split to ``pretraining.json``; returns those."""
    from perceptio.data.readers import read_refer

    root = Path(root)
    sam_config = preset_segmenter_config(preset)
    size = sam_config.prompt_encoder_config.image_size
    images = image_root or ((root / "images") if (root / "images").is_dir() else None)
    train_objects = load_objects(read_refer(root, "refcoco", split="train", image_root=images), size)
    val_objects = load_objects(read_refer(root, "refcoco", split="val", image_root=images), size, distinct=False)
    sam = pretrain_segmenter(train_objects, sam_config, config, out_dir, progress=progress, resume=resume)
    reference = point_prompt_ciou(sam, val_objects)
    summary_path = Path(out_dir) / "pretraining.json"
    summary = json.loads(summary_path.read_text())
    summary["val_point_prompt"] = reference
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return reference
