"""From a data folder to a trained and evaluated depth tokenizer: what `perceptio tokenizer ...` runs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from perceptio.data.errors import BadItemReport, DataError
from perceptio.tokenizers.depth.config import PRESETS, DepthTokenizerConfig
from perceptio.tokenizers.depth.evaluate import evaluate_tokenizer, reconstruction_grid
from perceptio.tokenizers.depth.model import DepthTokenizer
from perceptio.tokenizers.depth.teachers import TeacherCache, TeacherMap, load_teacher, teacher_maps
from perceptio.tokenizers.depth.train import TokenizerTrainConfig, find_depth_samples, train_tokenizer

__all__ = ["collect_teacher_maps", "default_cache_dir", "evaluate_folder", "train_from_folder"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$PERCEPTIO_CACHE/teacher_maps``, else ``~/.cache/perceptio/teacher_maps``."""
    root = os.environ.get("PERCEPTIO_CACHE")
    return Path(root) / "teacher_maps" if root else Path.home() / ".cache" / "perceptio" / "teacher_maps"


def collect_teacher_maps(
    data: str | Path,
    *,
    split: str,
    size: int,
    teacher: str = "ground-truth",
    image_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    limit: int | None = None,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
    progress: bool = True,
) -> list[TeacherMap]:
    """Teacher maps (in the tokenizer convention, ``size`` x ``size``) for one split of a data folder."""
    samples = find_depth_samples(data, split=split, image_dir=image_dir)
    if limit is not None:
        samples = samples[:limit]
    depth_teacher = load_teacher(teacher, device=device)
    if depth_teacher.teacher_id == "ground-truth" and samples and samples[0].depth is None:
        raise DataError(
            "these images have no depth maps, so the ground-truth teacher cannot be used",
            path=data,
            fix="pass --teacher depth-anything:/path/to/checkpoint",
        )
    cache = TeacherCache(cache_dir or default_cache_dir())
    maps, _ = teacher_maps(
        samples, depth_teacher, size=size, cache=cache, progress=progress, skip_bad=skip_bad, report=report
    )
    if not maps:
        raise DataError(
            f"no usable depth maps in split {split!r}", path=data, fix="check the folder, or the --skip-bad report"
        )
    return maps


def train_from_folder(
    data: str | Path,
    out: str | Path,
    *,
    preset: str = "tiny",
    train_config: TokenizerTrainConfig | None = None,
    teacher: str = "ground-truth",
    split: str = "train",
    image_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    resume: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    overrides: dict | None = None,
) -> tuple[DepthTokenizer, BadItemReport]:
    """Compute (or reuse cached) teacher maps for ``split`` of ``data`` and train a tokenizer into ``out``."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    config = DepthTokenizerConfig.from_dict({**PRESETS[preset].to_dict(), **(overrides or {})})
    report = BadItemReport()
    maps = collect_teacher_maps(
        data,
        split=split,
        size=config.input_size,
        teacher=teacher,
        image_dir=image_dir,
        cache_dir=cache_dir,
        device=device,
        skip_bad=skip_bad,
        report=report,
        progress=progress,
    )
    record = {"data": str(data), "split": split, "teacher": teacher, "preset": preset, "skipped": len(report)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(report):
        report.write(out / "skipped.json")
    model = train_tokenizer(
        np.stack([m.depth for m in maps]),
        config,
        train_config or TokenizerTrainConfig(),
        out,
        resume=resume,
        progress=progress,
        record=record,
    )
    np.save(out / "mean_map.npy", np.mean([m.depth for m in maps], axis=0).astype(np.float32))
    return model, report


def evaluate_folder(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "val",
    teacher: str = "ground-truth",
    image_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    limit: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict[str, object]:
    """Evaluate a saved tokenizer on ``split`` of ``data``; writes ``metrics.json`` and ``reconstructions.png``.

    The mean-map baseline uses ``mean_map.npy`` saved with the checkpoint by training; without it the mean of
    this split's maps is used (and the results say so).
    """
    tokenizer = DepthTokenizer.from_pretrained(checkpoint, map_location=device)
    report = BadItemReport()
    maps = collect_teacher_maps(
        data,
        split=split,
        size=tokenizer.config.input_size,
        teacher=teacher,
        image_dir=image_dir,
        cache_dir=cache_dir,
        device=device,
        limit=limit,
        skip_bad=skip_bad,
        report=report,
        progress=progress,
    )
    mean_path = Path(checkpoint) / "mean_map.npy"
    if mean_path.is_file():
        mean_map, baseline_source = np.load(mean_path), "mean training map"
    else:
        mean_map, baseline_source = np.mean([m.depth for m in maps], axis=0), f"mean map of the {split} split itself"
    results = evaluate_tokenizer(tokenizer, maps, mean_map=mean_map, seed=seed)
    results.update(
        checkpoint=str(checkpoint),
        data=str(data),
        split=split,
        teacher=teacher,
        skipped=len(report),
        baseline=baseline_source,
        config=tokenizer.config.to_dict(),
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    reconstruction_grid(tokenizer, maps, n=8).save(out / "reconstructions.png")
    if len(report):
        report.write(out / "skipped.json")
    return results
