"""From a data folder to a trained and evaluated depth tokenizer: what `perceptio tokenizer ...` runs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import read_depth_folder
from perceptio.data.readers.depth import IMAGE_SUFFIXES
from perceptio.data.schema import ImageRef, Sample, Task
from perceptio.tokenizers.depth.config import DepthTokenizerConfig
from perceptio.tokenizers.depth.evaluate import evaluate_tokenizer, reconstruction_grid
from perceptio.tokenizers.depth.model import DepthTokenizer
from perceptio.tokenizers.depth.teachers import GroundTruthTeacher, TeacherCache, TeacherMap, load_teacher, teacher_maps
from perceptio.tokenizers.depth.train import TokenizerTrainConfig, train_tokenizer
from perceptio.utils.runlock import run_lock

__all__ = [
    "collect_teacher_maps",
    "default_cache_dir",
    "evaluate_folder",
    "find_depth_samples",
    "mean_depth_map",
    "train_from_folder",
]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$PERCEPTIO_CACHE/teacher_maps``, else ``~/.cache/perceptio/teacher_maps``."""
    root = os.environ.get("PERCEPTIO_CACHE")
    return Path(root) / "teacher_maps" if root else Path.home() / ".cache" / "perceptio" / "teacher_maps"


def find_depth_samples(
    data: str | Path,
    *,
    split: str = "train",
    image_dir: str | Path | None = None,
    require_images: bool = True,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> list[Sample]:
    """The samples to train or evaluate on, from any of three kinds of folder.

    * a synthetic world (has ``manifest.json``): ``depth/<split>`` paired with ``images/``;
    * a depth folder (depth maps with a ``depth.json`` sidecar, images in ``image_dir`` or the same folder);
    * a plain folder of images (for a network teacher such as Depth Anything): no depth attached.

    ``require_images=False`` lets depth maps without an image through (enough for the ground-truth teacher).
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
        folder_args = {"require_images": require_images, "skip_bad": skip_bad, "report": report}
        return read_depth_folder(folder, image_dir=root / "images", split=split, **folder_args)
    if (root / "depth.json").is_file():
        folder_args = {"require_images": require_images, "skip_bad": skip_bad, "report": report}
        return read_depth_folder(root, image_dir=image_dir, split=split, **folder_args)
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
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
    depth_teacher = load_teacher(teacher, device=device)
    ground_truth = depth_teacher.teacher_id == GroundTruthTeacher.teacher_id
    samples = find_depth_samples(
        data, split=split, image_dir=image_dir, require_images=not ground_truth, skip_bad=skip_bad, report=report
    )
    if limit is not None:
        samples = samples[:limit]
    if ground_truth and samples and samples[0].depth is None:
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
    """Compute (or reuse cached) teacher maps for ``split`` of ``data`` and train a tokenizer into ``out``.

    Raises ``RunFolderLockedError`` at once when another process writes into ``out``."""
    with run_lock(out, "tokenizer training"):
        return _train_from_folder(
            data,
            Path(out),
            preset=preset,
            train_config=train_config,
            teacher=teacher,
            split=split,
            image_dir=image_dir,
            cache_dir=cache_dir,
            device=device,
            resume=resume,
            skip_bad=skip_bad,
            progress=progress,
            overrides=overrides,
        )


def _train_from_folder(
    data: str | Path,
    out: Path,
    *,
    preset: str,
    train_config: TokenizerTrainConfig | None,
    teacher: str,
    split: str,
    image_dir: str | Path | None,
    cache_dir: str | Path | None,
    device: str,
    resume: bool,
    skip_bad: bool,
    progress: bool,
    overrides: dict | None,
) -> tuple[DepthTokenizer, BadItemReport]:
    config = DepthTokenizerConfig.from_preset(preset, **(overrides or {}))
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
        valid=np.stack([m.valid for m in maps]),
        device=device,
        resume=resume,
        progress=progress,
        record=record,
    )
    np.save(out / "mean_map.npy", mean_depth_map(maps))
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
        mean_map, baseline_source = mean_depth_map(maps), f"mean map of the {split} split itself"
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


def mean_depth_map(maps: list[TeacherMap]) -> np.ndarray:
    """The mean-map baseline of depth metrics: the per-pixel mean of ``maps`` where they are valid (0.5 where none
    is)."""
    depth = np.stack([m.depth for m in maps]).astype(np.float64)
    valid = np.stack([m.valid for m in maps])
    count = valid.sum(0)
    return np.where(count > 0, (depth * valid).sum(0) / np.maximum(count, 1), 0.5).astype(np.float32)
