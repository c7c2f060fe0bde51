"""Generate the synthetic spatial world and write it in the real benchmark and training formats.

Layout of the output folder (every reader in :mod:`perceptio.data.readers` loads its part)::

    manifest.json                      seed, sizes, configs, counts, depth convention
    scenes.jsonl                       one line per image: split, camera, objects with measured facts
    images/synth_000000.png            the RGB images (the "COCO image root")
    depth/<split>/synth_000000.npy     float32 metric z-depth in metres, with depth/<split>/depth.json
    refcoco/instances.json             COCO images/annotations (RLE masks of every object)/categories
    refcoco/refs(unc).p                refer-style refs, splits train/val/testA/testB
    hardblink/<split>/...              HardBLINK layout, one folder per point count (2-5)
    mmbench/<split>.tsv                MMBench-style multiple choice, with circular copies
    vqa/<split>.json                   LLaVA/InternVL conversation JSON (short answers)

Splits are by image: no image appears in two splits. RefCOCO's testA holds the test images with at most three
objects and testB those with more (the real testA/testB are people/objects; ours are sparse/crowded scenes).
The folder is written under ``<out>.partial`` and renamed when complete, so an interrupted run never leaves a
folder that looks finished.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import csv
import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from perceptio.data.formats import CIRCULAR_OFFSET, option_letters
from perceptio.data.schema import DEPTH_CONVENTIONS
from perceptio.data.synthetic.render import Rendering, render_scene
from perceptio.data.synthetic.scene import SHAPES, Scene, SceneConfig, sample_scene
from perceptio.data.synthetic.tasks import (
    MarkerStyle,
    ObjectFacts,
    TaskConfig,
    draw_markers,
    measure_objects,
    referring_expressions,
    relative_depth_question,
    vqa_items,
)

__all__ = ["SPLITS", "WorldConfig", "WorldScene", "WorldSummary", "generate_world", "render_world_scene"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the synthetic world besides the seed and the number of images."""

    image_size: int = 128
    """Square image side in pixels (128 default; 64 for the tiny preset)."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Fractions of images in train, val and test."""
    marker_counts: tuple[int, ...] = (2, 3, 4, 5)
    """Point counts of the relative-depth questions; image i gets ``marker_counts[i % len]`` points."""
    noise: bool = False
    """Add faint sensor noise to the RGB images (depth stays exact)."""
    scene: SceneConfig = field(default_factory=SceneConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    markers: MarkerStyle = field(default_factory=MarkerStyle)

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if (
            len(self.split_fractions) != 3
            or any(f < 0 for f in self.split_fractions)
            or abs(sum(self.split_fractions) - 1) > 1e-6
        ):
            raise ValueError(
                f"split_fractions must be three non-negative numbers summing to 1, got {self.split_fractions}"
            )
        if not self.marker_counts or any(not 2 <= k <= 26 for k in self.marker_counts):
            raise ValueError(f"marker_counts must be point counts between 2 and 26, got {self.marker_counts}")


@dataclass
class WorldSummary:
    """Counts of what :func:`generate_world` wrote, per split."""

    out_dir: Path
    images: Counter = field(default_factory=Counter)
    objects: Counter = field(default_factory=Counter)
    referring_expressions: Counter = field(default_factory=Counter)
    relative_depth: Counter = field(default_factory=Counter)  # key "split/Npt"
    relative_depth_skipped: Counter = field(default_factory=Counter)
    vqa: Counter = field(default_factory=Counter)
    mcq_rows: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, which a Counter would count.
        return {
            f.name: (dict(v) if isinstance(v := getattr(self, f.name), Counter) else v)
            for f in fields(self)
            if f.name != "out_dir"
        }


@dataclass(frozen=True)
class WorldScene:
    """One scene of the world: its geometry, its rendering and what is visible of each object."""

    index: int
    scene: Scene
    rendering: Rendering
    facts: list[ObjectFacts]


def render_world_scene(seed: int, index: int, config: WorldConfig, *, max_tries: int = 50) -> WorldScene:
    """Render scene ``index`` of the world with ``seed``: redraw until every object is visible enough.

    Each scene draws from its own generator seeded with ``(seed, index)``, so scenes are independent of each
    other and of the order they are made in.
    """
    rng = np.random.default_rng([seed, index])
    min_pixels = max(1, int(config.scene.min_visible_fraction * config.image_size**2))
    for _ in range(max_tries):
        scene = sample_scene(rng, config.scene, config.image_size)
        if len(scene.objects) < config.scene.min_objects:
            continue
        rendering = render_scene(scene, noise=rng if config.noise else None)
        facts = measure_objects(scene, rendering)
        if all(f.visible_pixels >= min_pixels for f in facts):
            return WorldScene(index, scene, rendering, facts)
    raise RuntimeError(
        f"scene {index}: no arrangement with every object visible in {max_tries} tries; relax SceneConfig"
    )


def _assign_splits(num_images: int, seed: int, fractions: tuple[float, float, float]) -> list[str]:
    counts = [int(round(f * num_images)) for f in fractions]
    if num_images >= 3:  # every split with a non-zero fraction gets at least one image
        for i, f in enumerate(fractions):
            if f > 0 and counts[i] == 0:
                counts[i] = 1
    counts[0] = num_images - counts[1] - counts[2]
    labels = [s for s, c in zip(SPLITS, counts, strict=True) for _ in range(c)]
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(num_images)
    out = [""] * num_images
    for position, image_index in enumerate(order):
        out[image_index] = labels[position]
    return out


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _Writers:
    """Open output files and the accumulated annotations of the formats written at the end."""

    def __init__(self, root: Path, config: WorldConfig) -> None:
        self.root = root
        self.config = config
        for sub in ("images", "refcoco", "mmbench", "vqa"):
            (root / sub).mkdir(parents=True)
        self.scenes = (root / "scenes.jsonl").open("w")
        self.coco_images: list[dict[str, Any]] = []
        self.coco_annotations: list[dict[str, Any]] = []
        self.refs: list[dict[str, Any]] = []
        self.vqa: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.hardblink: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.mcq: dict[str, Any] = {}
        self.mcq_index: Counter = Counter()
        self.depth_dirs: set[str] = set()

    def hardblink_files(self, split: str, num_points: int) -> tuple[Any, Any]:
        key = (split, num_points)
        if key not in self.hardblink:
            base = self.root / "hardblink" / split
            (base / "images" / f"blink{num_points}pointscenter").mkdir(parents=True)
            (base / "questions").mkdir(exist_ok=True)
            (base / "answers").mkdir(exist_ok=True)
            self.hardblink[key] = (
                (base / "questions" / f"blink_{num_points}pointscenter_questions.jsonl").open("w"),
                (base / "answers" / f"blink_{num_points}pointscenter_answers.jsonl").open("w"),
            )
        return self.hardblink[key]

    def mcq_writer(self, split: str) -> Any:
        if split not in self.mcq:
            handle = (self.root / "mmbench" / f"{split}.tsv").open("w", newline="")
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(
                [
                    "index",
                    "question",
                    "hint",
                    "A",
                    "B",
                    "C",
                    "D",
                    "answer",
                    "category",
                    "l2-category",
                    "split",
                    "source",
                    "comment",
                    "image",
                ]
            )
            self.mcq[split] = (handle, writer)
        return self.mcq[split][1]

    def depth_dir(self, split: str) -> Path:
        path = self.root / "depth" / split
        if split not in self.depth_dirs:
            path.mkdir(parents=True)
            sidecar = {
                "convention": DEPTH_CONVENTIONS["metric_m"].to_dict(),
                "format": "npy float32, shape (H, W)",
                "description": "exact metric z-depth (distance along the optical axis) of the synthetic world, metres",
            }
            (path / "depth.json").write_text(json.dumps(sidecar, indent=2) + "\n")
            self.depth_dirs.add(split)
        return path

    def close(self) -> None:
        self.scenes.close()
        for questions, answers in self.hardblink.values():
            questions.close()
            answers.close()
        for handle, _ in self.mcq.values():
            handle.close()


_L2 = {
    "color": "attribute_recognition",
    "shape": "attribute_recognition",
    "count": "counting",
    "spatial": "spatial_relation",
}


def _write_scene(w: _Writers, record: WorldScene, split: str, summary: WorldSummary, rng: np.random.Generator) -> None:
    config = w.config
    n = config.image_size
    image_id = record.index + 1
    stem = f"synth_{record.index:06d}"
    file_name = f"{stem}.png"
    rgb = Image.fromarray(record.rendering.rgb)
    (w.root / "images" / file_name).write_bytes(_png_bytes(rgb))
    np.save(w.depth_dir(split) / f"{stem}.npy", record.rendering.depth)
    summary.images[split] += 1
    summary.objects[split] += len(record.facts)

    # Referring segmentation: every object is a COCO annotation; objects with an unambiguous expression get a ref.
    refcoco_split = split if split != "test" else ("testA" if len(record.facts) <= 3 else "testB")
    w.coco_images.append({"id": image_id, "file_name": file_name, "height": n, "width": n})
    scene_objects = []
    for obj, facts in zip(record.scene.objects, record.facts, strict=True):
        ann_id = image_id * 100 + obj.object_id
        mask = record.rendering.mask(obj.object_id)
        w.coco_annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": SHAPES.index(obj.shape) + 1,
                "segmentation": _rle(mask),
                "area": int(mask.sum()),
                "bbox": list(facts.bbox),
                "iscrowd": 0,
            }
        )
        expressions = referring_expressions(facts, record.facts, n, config.tasks, rng)
        scene_objects.append(
            {
                **obj.to_dict(),
                **facts.to_dict(),
                "ann_id": ann_id,
                "expressions": [e.to_dict() | {"text": e.text()} for e in expressions],
            }
        )
        if not expressions:
            continue
        ref_id = len(w.refs)
        sentences = []
        for k, expr in enumerate(expressions):
            sent = expr.text()
            sentences.append(
                {"sent_id": ref_id * 10 + k, "sent": sent, "raw": sent[0].upper() + sent[1:], "tokens": sent.split()}
            )
        w.refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "category_id": SHAPES.index(obj.shape) + 1,
                "split": refcoco_split,
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": f"{stem}_{ref_id}.png",
            }
        )
        summary.referring_expressions[refcoco_split] += len(sentences)

    w.scenes.write(
        json.dumps(
            {
                "scene_id": record.index,
                "image_id": image_id,
                "file_name": file_name,
                "split": split,
                "refcoco_split": refcoco_split,
                "camera": record.scene.camera.to_dict(),
                "light_direction": list(record.scene.light_direction),
                "objects": scene_objects,
            }
        )
        + "\n"
    )

    # Relative depth with lettered markers, HardBLINK layout (question ids count up per split and point count).
    num_points = config.marker_counts[record.index % len(config.marker_counts)]
    question = relative_depth_question(record.rendering, num_points, config.tasks, rng)
    if question is None:
        summary.relative_depth_skipped[f"{split}/{num_points}pt"] += 1
    else:
        questions, answers = w.hardblink_files(split, num_points)
        qid = summary.relative_depth[f"{split}/{num_points}pt"]
        marked = draw_markers(record.rendering.rgb, question.points, config.markers)
        image_dir = w.root / "hardblink" / split / "images" / f"blink{num_points}pointscenter"
        (image_dir / f"{qid}.png").write_bytes(_png_bytes(marked))
        points = [
            {"label": lab, "x": x, "y": y, "depth": d}
            for (lab, x, y), d in zip(question.points, question.depths, strict=True)
        ]
        questions.write(
            json.dumps(
                {
                    "question_id": qid,
                    "image": f"{qid}.png",
                    "text": question.question,
                    "category": "relative_depth",
                    "points": points,
                    "scene_id": record.index,
                    "source_image": file_name,
                }
            )
            + "\n"
        )
        answers.write(
            json.dumps({"question_id": qid, "text": f"({question.answer})", "category": "relative_depth"}) + "\n"
        )
        summary.relative_depth[f"{split}/{num_points}pt"] += 1

    # General VQA: short answers as LLaVA conversations, and the same questions as circular multiple choice.
    image_ref: str | None = None
    for item in vqa_items(record.facts, n, config.tasks, rng):
        w.vqa[split].append(
            {
                "id": f"{stem}_{item.category}",
                "image": file_name,
                "task": "vqa",
                "category": item.category,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{item.question}"},
                    {"from": "gpt", "value": item.answer},
                ],
            }
        )
        summary.vqa[split] += 1
        options = list(item.options)
        order = rng.permutation(len(options))
        options = [options[i] for i in order]
        g_index = w.mcq_index[split]
        w.mcq_index[split] += 1
        writer = w.mcq_writer(split)
        for k in range(len(options)):  # pass k shows the options rotated k times
            rotated = options[k:] + options[:k]
            index = g_index + k * CIRCULAR_OFFSET
            if image_ref is None:
                image_cell, image_ref = _jpeg_b64(rgb), str(index)
            else:
                image_cell = image_ref  # VLMEvalKit convention: a short cell names the row whose image is reused
            cells = rotated + [""] * (4 - len(rotated))
            answer = option_letters(len(rotated))[rotated.index(item.answer)]
            writer.writerow(
                [
                    index,
                    item.question,
                    "",
                    *cells,
                    answer,
                    item.category,
                    _L2[item.category],
                    split,
                    "perceptio-synthetic",
                    file_name,
                    image_cell,
                ]
            )
            summary.mcq_rows[split] += 1


def default_render_workers(num_images: int) -> int:
    """Rendering processes for a world of ``num_images``: one per usable core, none for a small world (starting a
    process costs about a second, the time of 50 scenes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 and num_images >= 200 else 0


def _rendered_scenes(seed: int, num_images: int, config: WorldConfig, workers: int) -> Iterator[WorldScene]:
    """The scenes ``0 .. num_images - 1`` in order, rendered here or by ``workers`` spawned processes (a few scenes
    ahead of the writer each; a worker that dies raises here instead of leaving the job waiting)."""
    if workers == 0:
        yield from (render_world_scene(seed, index, config) for index in range(num_images))
        return
    context = multiprocessing.get_context("spawn")  # numpy only in the workers; nothing inherited from the caller
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: collections.deque[concurrent.futures.Future[WorldScene]] = collections.deque()
        indices = iter(range(num_images))
        while True:
            while len(pending) < 4 * workers and (index := next(indices, None)) is not None:
                pending.append(pool.submit(render_world_scene, seed, index, config))
            if not pending:
                return
            yield pending.popleft().result()


def generate_world(
    out_dir: str | Path,
    *,
    num_images: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 0,
) -> WorldSummary:
    """Render ``num_images`` scenes and write every format into ``out_dir``.

    Args:
        out_dir: output folder; must not exist unless ``overwrite``.
        num_images: number of images (scenes), split by image into train/val/test.
        seed: the world's seed; the same seed, size and config give byte-identical files.
        config: world settings (image size, splits, scene and task margins).
        overwrite: replace an existing ``out_dir``.
        progress: show a progress bar.
        workers: processes that render scenes ahead while this one writes them (0: render here). Each scene is a
            function of ``(seed, index)`` alone, so the files are the same whatever the number of workers.

    Returns:
        Per-split counts of what was written.
    """
    import time

    config = config or WorldConfig()
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) or choose another --out")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    start = time.perf_counter()
    summary = WorldSummary(out_dir=out_dir)
    splits = _assign_splits(num_images, seed, config.split_fractions)
    writers = _Writers(partial, config)
    try:
        scenes = _rendered_scenes(seed, num_images, config, workers)
        bar = tqdm(scenes, total=num_images, desc="rendering synthetic world", unit="img", disable=not progress)
        for index, record in enumerate(bar):
            task_rng = np.random.default_rng([seed, index, 1])
            _write_scene(writers, record, splits[index], summary, task_rng)
    finally:
        writers.close()

    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    instances = {"images": writers.coco_images, "annotations": writers.coco_annotations, "categories": categories}
    (partial / "refcoco" / "instances.json").write_text(json.dumps(instances))
    with (partial / "refcoco" / "refs(unc).p").open("wb") as handle:
        pickle.dump(writers.refs, handle, protocol=2)  # protocol 2, as the original Python-2 refer pickles
    for split in SPLITS:
        if summary.images[split]:
            (partial / "vqa" / f"{split}.json").write_text(json.dumps(writers.vqa[split], indent=1))
    summary.seconds = time.perf_counter() - start
    manifest = {
        "generator": "perceptio.data.synthetic",
        "seed": seed,
        "num_images": num_images,
        "config": asdict(config),
        "depth_convention": DEPTH_CONVENTIONS["metric_m"].to_dict(),
        "counts": {k: v for k, v in summary.to_dict().items() if k != "seconds"},  # timings would break byte-identity
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return summary
