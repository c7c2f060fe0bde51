"""Depth teachers: where the tokenizer's training targets come from, behind one small protocol.

* :class:`GroundTruthTeacher`: the depth map stored with each sample (the synthetic world's exact depth, or any
  depth folder the readers load: NYU, KITTI, ``.npy``/``.npz``, Depth Anything PNGs).
* :class:`DepthAnythingTeacher`: a Depth Anything (V1 or V2) checkpoint in transformers format, loaded from a
  local directory with ``DepthAnythingForDepthEstimation.from_pretrained`` and the PIL image processor.

:func:`teacher_maps` turns samples into :class:`TeacherMap` s in the tokenizer convention at a given size.
Outputs of an expensive teacher are cached on disk (:class:`TeacherCache`), keyed by the image's content hash,
the teacher id (which hashes the checkpoint) and the resolution, so a second run does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from perceptio.data.errors import BadItemReport, DataError, handle
from perceptio.data.schema import Sample
from perceptio.tokenizers.depth.normalize import DepthInputError, DepthStats, Quantity, normalize_depth, resize_nearest

__all__ = [
    "DepthAnythingTeacher",
    "DepthTeacher",
    "GroundTruthTeacher",
    "RawDepth",
    "TeacherCache",
    "TeacherMap",
    "image_hash",
    "load_teacher",
    "teacher_maps",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawDepth:
    """A teacher's output for one image: values (H, W), what they mean, and which pixels are valid."""

    values: np.ndarray
    quantity: Quantity
    metric: bool
    valid: np.ndarray | None = None


@dataclass(frozen=True)
class TeacherMap:
    """One training target: ``depth`` (S, S) float32 in [0, 1] (1 = nearest), ``valid`` (S, S) bool (pixels
    with a measurement; invalid ones hold 0 and are left out of losses and metrics), the inverse-depth range the
    map was normalised with, and whether that range is metric (1/metres) or relative."""

    depth: np.ndarray
    valid: np.ndarray
    stats: DepthStats
    metric: bool


@runtime_checkable
class DepthTeacher(Protocol):
    """Anything that gives depth for samples."""

    @property
    def teacher_id(self) -> str:
        """Stable id of the teacher (and its weights), part of the cache key."""
        ...

    @property
    def metric(self) -> bool:
        """True when outputs are metric depth / inverse depth."""
        ...

    @property
    def cacheable(self) -> bool:
        """True when outputs are worth caching on disk (a network; not a file read)."""
        ...

    def predict(self, samples: Sequence[Sample]) -> list[RawDepth]:
        """Depth for each sample's image, at the image's resolution."""
        ...


class GroundTruthTeacher:
    """The depth map each sample carries (``Sample.depth``), in its own file convention."""

    teacher_id = "ground-truth"
    cacheable = False
    #: Whether a map is metric is a property of each file's convention (RawDepth.metric); this is the default.
    metric = True

    def predict(self, samples: Sequence[Sample]) -> list[RawDepth]:
        out = []
        for sample in samples:
            if sample.depth is None:
                raise DataError(
                    "sample has no depth map for the ground-truth teacher",
                    item=sample.sample_id,
                    fix="use a depth folder (depth maps next to images) or --teacher depth-anything:DIR",
                )
            depth_map = sample.depth.load()
            convention = depth_map.convention
            out.append(RawDepth(depth_map.values, convention.quantity, convention.metric, depth_map.valid))
        return out


def _file_digest(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DepthAnythingTeacher:
    """Depth Anything V1/V2 (transformers format) from a local directory. Never downloads.

    Args:
        model_dir: a folder with ``config.json`` and the weights (``model.safetensors``), as saved by
            ``save_pretrained``; ``preprocessor_config.json`` is used when present (else the DPT defaults of
            Depth Anything: 518 px, keep aspect ratio, multiple of 14, ImageNet normalisation).
        device: where to run it.
        batch_size: images per forward pass.
    """

    cacheable = True

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_size: int = 4) -> None:
        from transformers import DepthAnythingForDepthEstimation, DPTImageProcessorPil

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_dir}/config.json not found; pass a Depth Anything checkpoint folder (transformers format)"
            )
        weights = sorted(model_dir.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir}; pickled .bin checkpoints are not loaded")
        self.model = DepthAnythingForDepthEstimation.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
        if (model_dir / "preprocessor_config.json").is_file():
            self.processor = DPTImageProcessorPil.from_pretrained(model_dir)
        else:
            self.processor = DPTImageProcessorPil(
                size={"height": 518, "width": 518},
                keep_aspect_ratio=True,
                ensure_multiple_of=14,
                do_pad=False,
                image_mean=[0.485, 0.456, 0.406],
                image_std=[0.229, 0.224, 0.225],
                resample=3,
            )
        self.device = device
        self.batch_size = batch_size
        digest = hashlib.sha256((model_dir / "config.json").read_bytes())
        digest.update(json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode())
        for path in weights:
            digest.update(_file_digest(path).encode())
        self._id = f"depth-anything-{digest.hexdigest()[:16]}"
        self._metric = getattr(self.model.config, "depth_estimation_type", "relative") == "metric"

    @property
    def teacher_id(self) -> str:
        return self._id

    @property
    def metric(self) -> bool:
        return self._metric

    @torch.no_grad()
    def predict(self, samples: Sequence[Sample]) -> list[RawDepth]:
        images = [s.image.load() for s in samples]
        out: list[RawDepth | None] = [None] * len(images)
        # The processor keeps each image's aspect ratio, so only images of one size can share a forward pass.
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.size, []).append(index)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                inputs = self.processor(images=[images[i] for i in chunk], return_tensors="pt").to(self.device)
                outputs = self.model(**inputs)
                sizes = [(images[i].height, images[i].width) for i in chunk]
                results = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes)
                for i, result in zip(chunk, results, strict=True):
                    values = result["predicted_depth"].float().cpu().numpy()
                    # relative models output disparity-like values (larger = nearer); metric ones output metres
                    out[i] = RawDepth(values, "depth" if self._metric else "inverse_depth", self._metric)
        return out  # type: ignore[return-value]


def load_teacher(spec: str, *, device: str = "cpu") -> DepthTeacher:
    """A teacher from a command-line spec: ``ground-truth`` (alias ``exact``) or ``depth-anything:DIR``."""
    if spec in ("ground-truth", "exact"):
        return GroundTruthTeacher()
    if spec.startswith("depth-anything:"):
        return DepthAnythingTeacher(spec.split(":", 1)[1], device=device)
    raise ValueError(
        f"unknown teacher {spec!r}; use 'ground-truth' (alias 'exact') or 'depth-anything:/path/to/checkpoint'"
    )


def image_hash(sample: Sample) -> str:
    """SHA-256 of the sample's encoded image (file bytes or in-memory bytes)."""
    ref = sample.image
    if ref.data is not None:
        return hashlib.sha256(ref.data).hexdigest()
    try:
        return _file_digest(Path(ref.path))  # type: ignore[arg-type]
    except FileNotFoundError:
        raise DataError(
            "image file not found", path=ref.path, item=sample.sample_id, fix="check the image folder"
        ) from None


class TeacherCache:
    """Teacher maps on disk: ``root/v2/<teacher id>/<size>/<image hash>.npz`` (float16 map, validity, range, metric).

    Maps are stored as float16; :func:`teacher_maps` rounds freshly computed maps the same way, so a run that
    computes them and a run that reads them back train on identical targets.
    """

    #: Layout version: entries of another layout live elsewhere and are never misread.
    FORMAT = "v2"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _path(self, teacher_id: str, size: int, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", teacher_id)
        return self.root / self.FORMAT / safe / str(size) / key[:2] / f"{key}.npz"

    def get(self, teacher_id: str, size: int, key: str) -> TeacherMap | None:
        path = self._path(teacher_id, size, key)
        if not path.is_file():
            self.misses += 1
            return None
        with np.load(path) as payload:
            self.hits += 1
            return TeacherMap(
                depth=payload["depth"].astype(np.float32),
                valid=payload["valid"].astype(bool),
                stats=DepthStats(float(payload["low"]), float(payload["high"])),
                metric=bool(payload["metric"]),
            )

    def put(self, teacher_id: str, size: int, key: str, value: TeacherMap) -> None:
        path = self._path(teacher_id, size, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            depth=value.depth.astype(np.float16),
            valid=value.valid,
            low=value.stats.low,
            high=value.stats.high,
            metric=value.metric,
        )
        tmp.replace(path)  # atomic: a killed run never leaves a half-written entry


def teacher_maps(
    samples: Sequence[Sample],
    teacher: DepthTeacher,
    *,
    size: int,
    cache: TeacherCache | None = None,
    batch_size: int = 8,
    progress: bool = True,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> tuple[list[TeacherMap], list[Sample]]:
    """Teacher targets for ``samples`` at ``size`` x ``size`` in the tokenizer convention.

    Returns:
        The maps, and the samples they belong to (bad samples are left out only under ``skip_bad``, and
        recorded in ``report``).
    """
    use_cache = cache is not None and teacher.cacheable
    maps: list[TeacherMap] = []
    kept: list[Sample] = []
    bar = tqdm(total=len(samples), desc=f"teacher {teacher.teacher_id}", unit="img", disable=not progress)
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        results: dict[int, TeacherMap] = {}
        keys: dict[int, str] = {}
        failed: set[int] = set()
        if use_cache:
            for i, sample in enumerate(batch):
                try:
                    keys[i] = image_hash(sample)
                except DataError as err:
                    handle(err, skip_bad=skip_bad, report=report)
                    failed.add(i)
                    continue
                hit = cache.get(teacher.teacher_id, size, keys[i])  # type: ignore[union-attr]
                if hit is not None:
                    results[i] = hit
        todo = [i for i in range(len(batch)) if i not in results and i not in failed]
        raws: dict[int, RawDepth | DataError] = {}
        if todo:
            try:
                raws = dict(zip(todo, teacher.predict([batch[i] for i in todo]), strict=True))
            except DataError:
                for i in todo:  # find the bad one(s) one by one, so the rest of the batch survives
                    try:
                        raws[i] = teacher.predict([batch[i]])[0]
                    except DataError as err:
                        raws[i] = err
        for i in todo:
            raw = raws[i]
            try:
                if isinstance(raw, DataError):
                    raise raw
                results[i] = _to_teacher_map(raw, size, name=batch[i].sample_id, rounded=use_cache)
                if use_cache:
                    cache.put(teacher.teacher_id, size, keys[i], results[i])  # type: ignore[union-attr]
            except DataError as err:
                handle(err, skip_bad=skip_bad, report=report)
        for i, sample in enumerate(batch):
            if i in results:
                maps.append(results[i])
                kept.append(sample)
        bar.update(len(batch))
    bar.close()
    if use_cache:
        logger.info("teacher cache %s: %d hits, %d computed", cache.root, cache.hits, cache.misses)  # type: ignore[union-attr]
    return maps, kept


def _to_teacher_map(raw: RawDepth, size: int, *, name: str, rounded: bool) -> TeacherMap:
    """Normalise a raw teacher output and resize it (and its validity) to ``size`` with nearest neighbour."""
    try:
        normalized, stats = normalize_depth(raw.values, quantity=raw.quantity, valid=raw.valid, name="teacher depth")
    except DepthInputError as err:
        raise DataError(
            str(err),
            item=name,
            fix="check this depth map (perceptio data check --format depth lists every unusable one)",
        ) from None
    depth = resize_nearest(normalized, size)[0].numpy()
    if rounded:  # the precision the cache stores, so cached and fresh runs see the same numbers
        depth = depth.astype(np.float16).astype(np.float32)
    valid = np.isfinite(raw.values) & (True if raw.valid is None else np.asarray(raw.valid, dtype=bool))
    valid = resize_nearest(valid.astype(np.float32), size)[0].numpy() > 0.5
    return TeacherMap(depth=depth, valid=valid, stats=stats, metric=raw.metric)
