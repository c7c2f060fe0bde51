"""Training data: datasets from a recipe, their depth-span targets, and batches of model inputs.

Depth spans need the codes of each image's depth map under the model's depth tokenizer. They are computed once,
before training: the depth map comes from the sample itself (depth datasets), from the dataset's ``depth``
folder (maps named after the images; for marker images, after ``meta["source_image"]``), or from a Depth
Anything teacher (``data.teacher``), cached on disk by image hash. A sample whose task needs a span and that
has no depth source is an error that names the dataset and the fix.

Every random choice of a batch (which samples, which phrasing) derives from ``(seed, step)`` and the sample's
position in the global batch, so a batch does not depend on how many processes share it, nor on resumption.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import READERS, read_depth_folder, usable_samples
from perceptio.data.schema import Sample, Task
from perceptio.data.templates import render_sample
from perceptio.tokenizers.depth.model import DepthTokenizer
from perceptio.tokenizers.depth.teachers import (
    GroundTruthTeacher,
    TeacherCache,
    load_teacher,
    teacher_maps,
)
from perceptio.train.config import DataConfig, DatasetConfig
from perceptio.vocab import PerceptionVocab

__all__ = ["Example", "TrainingData", "load_dataset", "needs_depth_span"]

logger = logging.getLogger(__name__)


def _resolve(path: Path | None, root: Path | None) -> Path | None:
    if path is None or path.is_absolute() or root is None:
        return path
    return root / path


def load_dataset(
    name: str,
    spec: DatasetConfig,
    *,
    root: Path | None = None,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> list[Sample]:
    """Read one dataset of a recipe with its format's reader (relative paths from ``root``)."""
    path = _resolve(spec.path, root)
    image_root = _resolve(spec.image_root, root)
    options = dict(spec.options)
    reader = READERS[spec.format]
    if path is None or not path.exists():
        raise DataError(
            f"dataset {name!r}: {spec.format} data not found",
            path=path,
            fix="check data.datasets.<name>.path (relative paths start at data.root) or create the data first "
            "(perceptio data synth --out DIR makes the synthetic world)",
        )
    bad = {"skip_bad": skip_bad, "report": report}
    if spec.format == "refcoco":
        samples = reader(
            path,
            options.pop("dataset", "refcoco"),
            split=spec.split or "train",
            image_root=image_root,
            **options,
            **bad,
        )
    elif spec.format == "conversation":
        samples = reader(path, image_root=image_root, split=spec.split, source=name, **options, **bad)
    elif spec.format == "depth":
        samples = reader(path, image_dir=image_root, split=spec.split, **options, **bad)
    elif spec.format == "mmbench":
        samples = reader(path, **options, **bad)
    else:  # hardblink, blink
        samples = reader(path, split=spec.split, **options, **bad)
    if spec.limit is not None:
        samples = samples[: spec.limit]
    if not samples:
        raise DataError(f"dataset {name!r} is empty", path=path, fix="check its path, split and options")
    return samples


def needs_depth_span(sample: Sample, config: DataConfig) -> bool:
    """Whether the sample's target, as the templates render it under ``config``, holds a depth span."""
    if sample.task is Task.DEPTH:
        return True
    if sample.task is Task.RELATIVE_DEPTH:
        return config.spatial_cot
    if sample.task is Task.REFERRING_SEGMENTATION:
        return config.spatial_cot and config.seg_depth_span
    return False


def _image_key(sample: Sample) -> str | None:
    source = sample.meta.get("source_image") if sample.meta else None
    if source:
        return Path(str(source)).stem
    if sample.images and sample.images[0].path is not None:
        return Path(sample.images[0].path).stem
    return None


@dataclass(frozen=True)
class Example:
    """One rendered training example: the image, the user query, the target text and its target masks."""

    image: Image.Image
    query: str
    target: str
    masks: np.ndarray | None
    """bool (N, H, W), one per segmentation token of the target, or None."""
    task: str


class TrainingData:
    """Datasets by name, with the depth codes their spans need, rendered into examples on demand.

    Args:
        datasets: name -> samples.
        config: the recipe's data section (templates, depth sources).
        depth_tokenizer: encodes depth maps into the codes of the spans.
        specs: the datasets' recipe entries (their ``depth`` folders); default ``config.datasets``.
        cache_dir: where a network teacher's maps are cached.
        progress: show progress bars while computing depth codes.
    """

    def __init__(
        self,
        datasets: dict[str, list[Sample]],
        config: DataConfig,
        depth_tokenizer: DepthTokenizer,
        *,
        specs: dict[str, DatasetConfig] | None = None,
        report: BadItemReport | None = None,
        cache_dir: Path | None = None,
        progress: bool = True,
    ) -> None:
        self.datasets = dict(datasets)
        self.config = config
        self.specs = config.datasets if specs is None else specs
        self.vocab: PerceptionVocab = depth_tokenizer.vocab
        self.codes: dict[str, list[np.ndarray | None]] = {}
        self._attach_depth()
        if config.skip_bad:
            self._leave_out_unusable(report, progress)
        self._encode_depth(depth_tokenizer, cache_dir, progress)

    @classmethod
    def from_config(
        cls,
        config: DataConfig,
        depth_tokenizer: DepthTokenizer,
        *,
        specs: dict[str, DatasetConfig] | None = None,
        report: BadItemReport | None = None,
        cache_dir: Path | None = None,
        progress: bool = True,
    ) -> TrainingData:
        """Read every dataset of ``specs`` (default: ``config.datasets``) and compute their depth codes.

        With ``config.skip_bad``, every sample is also decoded once here (images, masks, depth maps: the checks of
        ``perceptio data check``) and the bad ones are left out and recorded in ``report``, so that a long run does
        not stop at the first bad item it draws.
        """
        specs = config.datasets if specs is None else specs
        datasets = {
            name: load_dataset(name, spec, root=config.root, skip_bad=config.skip_bad, report=report)
            for name, spec in specs.items()
        }
        return cls(
            datasets, config, depth_tokenizer, specs=specs, report=report, cache_dir=cache_dir, progress=progress
        )

    def sizes(self) -> dict[str, int]:
        return {name: len(samples) for name, samples in self.datasets.items()}

    def _attach_depth(self) -> None:
        """Give every sample that needs a span and has no depth map the map of its image from the dataset's folder."""
        for name, samples in self.datasets.items():
            spec = self.specs.get(name)
            folder = _resolve(spec.depth, self.config.root) if spec is not None else None
            if folder is None:
                continue
            if not folder.is_dir():
                raise DataError(f"dataset {name!r}: depth folder not found", path=folder, fix="check its depth path")
            index = {s.sample_id: s.depth for s in read_depth_folder(folder, require_images=False)}
            attached = []
            for sample in samples:
                key = _image_key(sample)
                if sample.depth is None and needs_depth_span(sample, self.config) and key in index:
                    sample = dataclasses.replace(sample, depth=index[key])
                attached.append(sample)
            self.datasets[name] = attached

    def _leave_out_unusable(self, report: BadItemReport | None, progress: bool) -> None:
        """Decode every sample once (images, masks, depth maps, with the checks of ``perceptio data check``) and
        leave out the bad ones, recorded in ``report``: a long run must not stop at the first bad item it draws."""
        decoded: dict[str, object] = {}  # each image and depth map is decoded once, however many samples share it
        for name, samples in self.datasets.items():
            kept = usable_samples(
                samples, skip_bad=True, report=report, progress=progress, decoded=decoded, where=f"dataset {name!r}, "
            )
            if not kept:
                raise DataError(
                    f"dataset {name!r}: every sample is unusable ({len(samples)} skipped)",
                    fix="check the data with perceptio data check, or remove the dataset from the recipe",
                )
            self.datasets[name] = kept

    def _encode_depth(self, tokenizer: DepthTokenizer, cache_dir: Path | None, progress: bool) -> None:
        size = tokenizer.config.input_size
        teacher = load_teacher(f"depth-anything:{self.config.teacher}") if self.config.teacher is not None else None
        cache = TeacherCache(cache_dir) if cache_dir is not None and teacher is not None else None
        # each map is encoded once, however many datasets use it (referring segmentation, depth and relative depth
        # often share their images). Encoded in each dataset's own batches instead, the 35,497 samples of the
        # quickstart's world that share a map with an earlier dataset got the same codes as now
        done: dict[str, np.ndarray] = {}
        for name, samples in self.datasets.items():
            wanted = [k for k, s in enumerate(samples) if needs_depth_span(s, self.config)]
            codes: list[np.ndarray | None] = [None] * len(samples)
            self.codes[name] = codes
            if not wanted:
                continue
            # one map per distinct image: many referring expressions share an image
            groups: dict[str, list[int]] = {}
            for k in wanted:
                sample = samples[k]
                if sample.depth is not None:
                    key = f"depth:{sample.depth.path}"
                elif teacher is not None and sample.images:
                    key = f"image:{sample.images[0].describe()}"
                else:
                    raise DataError(
                        f"dataset {name!r}: sample needs a depth span ({sample.task.value}) but has no depth map",
                        item=sample.sample_id,
                        fix=f"set data.datasets.{name}.depth to a folder of depth maps named after the images, "
                        "set data.teacher to a local Depth Anything checkpoint, or turn spans off "
                        "(data.spatial_cot=false / data.seg_depth_span=false)",
                    )
                groups.setdefault(key, []).append(k)
            for key in [key for key in groups if key in done]:
                for k in groups.pop(key):
                    codes[k] = done[key]
            firsts = [samples[members[0]] for members in groups.values()]
            with_depth = [s for s in firsts if s.depth is not None]
            by_teacher = [s for s in firsts if s.depth is None]
            maps = {}
            if with_depth:
                got, _ = teacher_maps(with_depth, GroundTruthTeacher(), size=size, progress=False)
                maps.update({f"depth:{s.depth.path}": m for s, m in zip(with_depth, got, strict=True)})
            if by_teacher:
                got, _ = teacher_maps(by_teacher, teacher, size=size, cache=cache, progress=progress)
                maps.update({f"image:{s.images[0].describe()}": m for s, m in zip(by_teacher, got, strict=True)})
            keys = list(groups)
            batch = 256
            bar = tqdm(total=len(keys), desc=f"depth codes: {name}", disable=not progress, leave=False)
            with torch.no_grad():
                for start in range(0, len(keys), batch):
                    chunk = keys[start : start + batch]
                    stacked = torch.from_numpy(np.stack([maps[k].depth for k in chunk]).astype(np.float32))
                    encoded = tokenizer.encode(stacked.to(tokenizer_device(tokenizer))).cpu().numpy()
                    for key, grid in zip(chunk, encoded, strict=True):
                        done[key] = grid
                        for k in groups[key]:
                            codes[k] = grid
                    bar.update(len(chunk))
            bar.close()

    def example(self, name: str, index: int, rng: np.random.Generator) -> Example:
        """Render sample ``index`` of dataset ``name`` (phrasing drawn from ``rng``)."""
        sample = self.datasets[name][index]
        codes = self.codes[name][index]
        rendered = render_sample(sample, self.vocab, rng, depth_codes=codes, spatial_cot=self.config.spatial_cot)
        image = sample.image.load()
        masks = None
        if rendered.num_masks:
            if sample.masks:
                masks = np.stack([m.decode() for m in sample.masks]).astype(bool)
            else:  # a no-target expression: one segmentation token whose mask is empty
                masks = np.zeros((1, image.height, image.width), dtype=bool)
        return Example(image, rendered.query, rendered.target, masks, sample.task.value)


def tokenizer_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def collate(examples: Sequence[Example], processor) -> dict:  # noqa: ANN001 - a PerceptioProcessor
    """Model inputs for a list of examples: ``processor`` outputs plus ``gt_masks``."""
    batch = dict(processor([e.image for e in examples], [e.query for e in examples], [e.target for e in examples]))
    batch["gt_masks"] = [torch.from_numpy(e.masks) if e.masks is not None else None for e in examples]
    return batch
