"""The grounding ladder: does the model look at the image? ``perceptio experiment grounding``.

Each level is one capability, trained from scratch on its own with the real model classes (``PerceptioProcessor``
and ``PerceptioForConditionalGeneration.forward``) and scored on held-out images:

* ``L0`` whole-image colour: the image is one colour of the world's palette (plus sensor noise);
* ``L1`` the colour of one small object (an ``object_px`` square) on a grey floor;
* ``L2`` binding: the colour or shape of the one object named by its other attributes, among 2-6 (world VQA);
* ``L3`` left/right of two named objects (world VQA);
* ``L4`` counting (world VQA);
* ``L5`` the closest of 2-5 lettered markers, answered after the depth span (the world's relative-depth questions,
  full Perceptio loss); scored teacher-forced, so the letter is read with the right span in the context. Besides
  the image-use gap it records the **span-use gap**: the answer loss with the spans swapped across the batch minus
  with the right ones (zero: the letter does not read the span);
* ``L6`` the segmentation-token mask of the referred object (cIoU, full Perceptio loss).

For each level and *arm* (a set of ``PerceptioConfig`` options, e.g. centred image tokens) it records accuracy
against steps (exact match of the whole answer under teacher forcing, which equals greedy decoding's exact
match), the answer prior (the most frequent training answer per question kind), and the **image-use gap**: the
validation loss with images shuffled across the batch minus the loss with the right images. A gap of zero
means the answer does not depend on the image.

Every (level, arm, seed) is one job whose result is written next to its settings digest; a repeated command reuses
finished jobs. Jobs run side by side through :func:`perceptio.pipeline.run_jobs`, each in its own one-thread
process with its output in a log beside its result.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from perceptio.pipeline import Job, base_fingerprint, run_jobs
from perceptio.utils.run_folder import settings_digest

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARMS",
    "LEVELS",
    "GroundingConfig",
    "LadderItem",
    "level_items",
    "plot_curves",
    "results_table",
    "run_grounding",
    "swap_spans",
]

#: Level name -> what it measures.
LEVELS: dict[str, str] = {
    "L0": "whole-image colour",
    "L1": "colour of one small object on the floor",
    "L2": "colour/shape of the object named by its other attributes (binding)",
    "L3": "left/right of two named objects",
    "L4": "count",
    "L5": "closest lettered marker, answered after the depth span (teacher-forced span)",
    "L6": "segmentation-token mask of the referred object (cIoU, teacher-forced)",
}
FLOOR_GREY = 120
"""L1's floor: darker than every palette colour (the palette's gray is 189), so each object stands out."""
WORLD_LEVELS = {"L2": ("color", "shape"), "L3": ("spatial",), "L4": ("count",)}
PERCEPTIO_LEVELS = ("L5", "L6")
"""Levels trained with the full Perceptio forward (spatial tokens, all loss terms) on a dataset of the world."""

#: Arm name -> ``PerceptioConfig`` fields it sets (on top of the tiny preset).
ARMS: dict[str, dict[str, Any]] = {
    "baseline": {"image_token_norm": "none"},
    "center": {"image_token_norm": "center"},
    "standardize": {"image_token_norm": "standardize"},
    "vinit": {"image_token_norm": "none", "vision_init_std": 0.1},
    "standardize+vinit": {"image_token_norm": "standardize", "vision_init_std": 0.1},
    "center+vinit": {"image_token_norm": "center", "vision_init_std": 0.1},
    "standardize+segrms": {"image_token_norm": "standardize", "seg_prompt_rms": 0.5},
    "standardize+pos": {"image_token_norm": "standardize", "image_token_pos": "sincos"},
    "standardize+pos+segrms": {"image_token_norm": "standardize", "image_token_pos": "sincos", "seg_prompt_rms": 0.5},
    # the pretrained tiny base (GroundingConfig.base) instead of random weights:
    "base": {"init": "base"},
    "base+segrms": {"init": "base", "seg_prompt_rms": 0.5},
}


@dataclass(frozen=True)
class LadderItem:
    """One question about one image. ``kind`` groups questions for the answer prior (e.g. colour vs shape)."""

    image: Any  # PIL.Image.Image
    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class GroundingConfig:
    """What ``perceptio experiment grounding`` runs."""

    out: Path
    world: Path | None = None
    """A rendered world (``perceptio data synth``); needed by L2-L4."""
    levels: tuple[str, ...] = ("L0", "L1", "L2", "L3", "L4")
    arms: tuple[str, ...] = ("baseline", "center", "standardize")
    steps: int = 600
    eval_every: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    seeds: int = 1
    train_images: int = 2000
    """Training questions per level (L0/L1 are drawn fresh; L2-L4 take the first ones of the world's train split)."""
    val_images: int = 300
    object_px: int = 8
    """Side of L1's object square at the world's 128-px resolution."""
    image_size: int = 128
    jobs: int = field(default_factory=lambda: max(1, len(os.sched_getaffinity(0))))
    preset: str = "tiny"
    base: Path | None = None
    """The pretrained base the ``base`` arm starts from (default: the shipped tiny base)."""
    segmenter: Path | None = None
    """A pretrained SAM2 (``perceptio segmenter pretrain``) for L6; default: ``segmenter/`` next to the world."""
    tokenizer: Path | None = None
    """A trained depth tokenizer (``perceptio tokenizer train``) for L5; default: ``tokenizer/`` next to the world."""

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.levels) - set(LEVELS)):
            raise ValueError(f"unknown level(s) {unknown}; the levels are {sorted(LEVELS)}")
        if unknown := sorted(set(self.arms) - set(ARMS)):
            raise ValueError(f"unknown arm(s) {unknown}; the arms are {sorted(ARMS)}")
        if min(self.steps, self.eval_every, self.batch_size, self.seeds, self.jobs) < 1:
            raise ValueError("steps, eval_every, batch_size, seeds and jobs must be at least 1")
        if min(self.train_images, self.val_images) < 2 or not 1 <= self.object_px <= self.image_size:
            raise ValueError("train_images and val_images must be >= 2 and object_px in [1, image_size]")
        if "base" in self.arms and self.base is None:
            from perceptio.weights import shipped

            object.__setattr__(self, "base", shipped("tiny-base"))  # FileNotFoundError says how to make one
        # level -> (its input field, what it reads of the world, what the input is, the command that makes it)
        inputs = {
            "L5": ("tokenizer", "relative-depth questions", "a trained depth tokenizer", "perceptio tokenizer train"),
            "L6": ("segmenter", "referring expressions", "a pretrained SAM2", "perceptio segmenter pretrain"),
        }
        for level, (name, reads, what, maker) in inputs.items():
            if level not in self.levels:
                continue
            if self.world is None:
                raise ValueError(f"level {level} reads the world's {reads}: give --world")
            if getattr(self, name) is None:  # default: the folder of that name next to the world
                object.__setattr__(self, name, Path(self.world).parent / name)
            if not (Path(getattr(self, name)) / "config.json").is_file():
                raise FileNotFoundError(
                    f"{level} needs {what} at {getattr(self, name)} ({maker}, or the quickstart); give --{name}"
                )
        if self.world is None and any(level in WORLD_LEVELS for level in self.levels):
            raise ValueError(f"levels {sorted(WORLD_LEVELS)} read the world's VQA: give --world (perceptio data synth)")


# ------------------------------------------------------------------------------------------------ the levels


def _palette() -> dict[str, np.ndarray]:
    from perceptio.data.synthetic.scene import COLORS

    return {name: (np.asarray(rgb) ** (1 / 2.2) * 255).astype(np.uint8) for name, rgb in COLORS.items()}


def _flat_items(level: str, count: int, config: GroundingConfig, rng: np.random.Generator) -> list[LadderItem]:
    from PIL import Image

    palette = _palette()
    names = sorted(palette)
    side, n = config.object_px, config.image_size
    items = []
    for _ in range(count):
        colour = names[int(rng.integers(len(names)))]
        noise = rng.integers(-10, 11, (n, n, 3))
        if level == "L0":
            pixels = palette[colour].astype(int) + noise
            question = "What color is the image?"
        else:
            pixels = np.full((n, n, 3), FLOOR_GREY) + noise
            x, y = rng.integers(0, n - side + 1, 2)
            pixels[y : y + side, x : x + side] = palette[colour]
            question = "What color is the object?"
        items.append(LadderItem(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), question, colour, "color"))
    return items


def _question_kind(question: str) -> str:
    q = question.lower()
    if q.startswith("what color"):
        return "color"
    if q.startswith("what shape"):
        return "shape"
    if q.startswith("how many"):
        return "count"
    return "spatial"


def _world_items(level: str, world: Path, split: str, count: int) -> list[LadderItem]:
    from perceptio.data.readers import read_conversations

    path = world / "vqa" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: render a world with `perceptio data synth --out {world}`")
    kinds = WORLD_LEVELS[level]
    items, cache = [], {}
    for sample in read_conversations(path, image_root=world / "images"):
        question = sample.query.replace("<image>", "").strip()
        kind = _question_kind(question)
        if kind not in kinds:
            continue
        key = sample.image.describe()
        if key not in cache:
            cache[key] = sample.image.load()
        items.append(LadderItem(cache[key], question, sample.answer, kind))
        if len(items) == count:
            break
    if len(items) < 2:
        raise ValueError(f"{path}: fewer than 2 {'/'.join(kinds)} questions for level {level}")
    return items


def level_items(level: str, config: GroundingConfig, seed: int = 0) -> tuple[list[LadderItem], list[LadderItem]]:
    """The (train, val) questions of ``level``. L0/L1 are drawn from ``seed``; L2-L4 read the world's splits."""
    if level in WORLD_LEVELS:
        assert config.world is not None
        world = Path(config.world)
        return (
            _world_items(level, world, "train", config.train_images),
            _world_items(level, world, "val", config.val_images),
        )
    rng = np.random.default_rng(1000 + seed)
    return _flat_items(level, config.train_images, config, rng), _flat_items(level, config.val_images, config, rng)


def answer_prior(train: Sequence[LadderItem], val: Sequence[LadderItem]) -> float:
    """Accuracy of always giving the most frequent training answer of the question's kind."""
    by_kind: dict[str, Counter] = {}
    for item in train:
        by_kind.setdefault(item.kind, Counter())[item.answer] += 1
    hits = [bool(by_kind.get(i.kind)) and by_kind[i.kind].most_common(1)[0][0] == i.answer for i in val]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------------------------- one job


class _Encoded:
    """Processor outputs of a list of items, computed once; batches are padded on the right."""

    def __init__(self, items: Sequence[LadderItem], processor) -> None:  # noqa: ANN001 - PerceptioProcessor

        self.rows = []
        pixels: dict[int, torch.Tensor] = {}
        for item in items:
            encoded = processor([item.image], [item.question], [item.answer])
            if id(item.image) not in pixels:
                pixels[id(item.image)] = encoded["pixel_values"][0]
            self.rows.append((encoded["input_ids"][0], encoded["labels"][0], pixels[id(item.image)]))
        self.pad = processor.text_tokenizer.pad_token_id

    def batch(self, index: Sequence[int]) -> dict[str, Any]:
        import torch

        from perceptio.losses import IGNORE_INDEX

        length = max(len(self.rows[i][0]) for i in index)
        ids = torch.full((len(index), length), self.pad)
        labels = torch.full((len(index), length), IGNORE_INDEX)
        attention = torch.zeros((len(index), length), dtype=torch.long)
        for k, i in enumerate(index):
            x, y, _ = self.rows[i]
            ids[k, : len(x)], labels[k, : len(y)], attention[k, : len(x)] = x, y, 1
        pixels = torch.stack([self.rows[i][2] for i in index])
        return {"input_ids": ids, "attention_mask": attention, "labels": labels, "pixel_values": pixels}


def _score(model, data: _Encoded, *, shuffle: bool, batch_size: int = 64) -> tuple[float, float]:  # noqa: ANN001
    """(exact-match accuracy, mean per-question answer loss); ``shuffle`` pairs each question with the image of the
    next question in its batch."""
    import torch
    import torch.nn.functional as F

    from perceptio.losses import IGNORE_INDEX

    was_training = model.training
    model.eval()
    hits, losses = [], []
    with torch.no_grad():
        for start in range(0, len(data.rows), batch_size):
            batch = data.batch(range(start, min(len(data.rows), start + batch_size)))
            if shuffle:
                batch["pixel_values"] = torch.roll(batch["pixel_values"], 1, dims=0)
            logits = model.vlm(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
            ).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            supervised = targets != IGNORE_INDEX
            token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
            losses += token_loss.sum(1).tolist()
            correct = (logits.argmax(-1) == targets) | ~supervised
            hits += correct.all(1).tolist()
    model.train(was_training)
    return float(np.mean(hits)), float(np.mean(losses))


def build_ladder_model(config: GroundingConfig, arm: str, seed: int):  # noqa: ANN201 - (model, processor)
    """The arm's starting model: the pretrained base, or a random ``config.preset`` with the arm's options."""
    import torch

    from perceptio.models.build import build_preset, load_model

    options = ARMS[arm]
    if "init" in options:
        from perceptio.weights import shipped

        torch.manual_seed(seed)
        model, processor = load_model(config.base or shipped("tiny-base"))
        if "seg_prompt_rms" in options:
            model.set_seg_prompt_rms(options["seg_prompt_rms"])
        return model, processor
    return build_preset(config.preset, seed=seed, **options)


def run_job(config: GroundingConfig, level: str, arm: str, seed: int) -> dict[str, Any]:
    """Train one fresh model on one level and return its result (:func:`run_grounding` runs it in a job's process
    and stores what it returns)."""
    import torch

    from perceptio.train.optim import build_optimizer, warmup_cosine

    if level in PERCEPTIO_LEVELS:
        return _run_perceptio_job(config, level, arm, seed)
    began = time.perf_counter()
    train_items, val_items = level_items(level, config, seed)
    model, processor = build_ladder_model(config, arm, seed)
    train, val = _Encoded(train_items, processor), _Encoded(val_items, processor)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, round(0.05 * config.steps))
    rng = np.random.default_rng(seed)
    curve = []

    def evaluate(step: int) -> None:
        accuracy, loss = _score(model, val, shuffle=False)
        shuffled_accuracy, shuffled_loss = _score(model, val, shuffle=True)
        curve.append(
            {
                "step": step,
                "accuracy": accuracy,
                "loss": loss,
                "shuffled_accuracy": shuffled_accuracy,
                "shuffled_loss": shuffled_loss,
                "image_use_gap": shuffled_loss - loss,
            }
        )

    evaluate(0)
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup_cosine(
                step, warmup_steps=warmup, total_steps=config.steps, min_lr_ratio=0.1
            )
        batch = train.batch(rng.integers(0, len(train.rows), config.batch_size).tolist())
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"level {level}, arm {arm}, seed {seed}: non-finite loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            evaluate(step + 1)
    return {
        "level": level,
        "arm": arm,
        "seed": seed,
        "options": ARMS[arm],
        "prior": answer_prior(train_items, val_items),
        "curve": curve,
        "final": curve[-1],
        "seconds": round(time.perf_counter() - began, 1),
    }


def _world_data(config: GroundingConfig, model, level: str, split: str, limit: int):  # noqa: ANN001, ANN202
    """The level's dataset of the world, as the trainer reads it: L5 the relative-depth questions with their
    depth spans, L6 the referring expressions (no span)."""
    from perceptio.train.config import DataConfig, DatasetConfig
    from perceptio.train.data import TrainingData

    world = Path(config.world)  # type: ignore[arg-type]
    if level == "L5":
        spec = DatasetConfig(
            format="hardblink",
            path=world / "hardblink" / split,
            split=split,
            depth=world / "depth" / split,
            limit=limit,
        )
        data = DataConfig(datasets={"data": spec}, spatial_cot=True)
    else:
        spec = DatasetConfig(format="refcoco", path=world, split=split, image_root=world / "images", limit=limit)
        data = DataConfig(datasets={"data": spec}, spatial_cot=False, seg_depth_span=False)
    return TrainingData.from_config(data, model.depth_tokenizer, progress=False)


def swap_spans(input_ids: torch.Tensor, labels: torch.Tensor, code_ids: range) -> torch.Tensor:
    """``input_ids`` with each row's depth codes replaced by the previous row's (rows rolled by one): the control
    of the span-use gap. Every row must hold the same number of code positions; the labels are left as they are."""
    codes = (labels >= code_ids.start) & (labels < code_ids.stop)
    counts = codes.sum(1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError(
            f"every row needs the same, non-zero number of depth codes to swap spans; got {counts.tolist()}"
        )
    swapped = input_ids.clone()
    rows = [input_ids[k][codes[k]] for k in range(len(input_ids))]
    for k in range(len(input_ids)):
        swapped[k][codes[k]] = rows[k - 1]
    return swapped


def _letter_ids(text_tokenizer) -> torch.Tensor:  # noqa: ANN001 - a transformers tokenizer
    """The ids of every token that reads as one marker letter (``B``, `` B``...)."""
    import torch

    letters = {chr(c) for c in range(ord("A"), ord("Z") + 1)}
    return torch.tensor(
        [i for i in range(len(text_tokenizer)) if text_tokenizer.decode([i]).strip() in letters], dtype=torch.long
    )


def _span_scores(  # noqa: ANN001
    model, batches: list[dict[str, Any]], letter_ids: torch.Tensor, *, shuffle: bool, swap: bool = False
) -> dict[str, float]:
    """L5, teacher-forced, the right span in the context (or with ``swap`` another row's): accuracy of the first
    letter token after the span (the validation answers are written " (B)"), the summed loss of the answer, and
    the code accuracy of the span itself."""
    import torch
    import torch.nn.functional as F

    from perceptio.losses import IGNORE_INDEX

    ids = model.config.resolved_token_ids
    was_training = model.training
    model.eval()
    hits, losses, code_hits = [], [], []
    with torch.no_grad():
        for batch in batches:
            input_ids, pixels = batch["input_ids"], batch["pixel_values"]
            if shuffle:
                pixels = torch.roll(pixels, 1, dims=0)
            if swap:
                input_ids = swap_spans(input_ids, batch["labels"], ids.code_ids)
            logits = model.vlm(input_ids=input_ids, attention_mask=batch["attention_mask"], pixel_values=pixels).logits
            logits, targets = logits[:, :-1], batch["labels"][:, 1:]
            position = torch.arange(targets.shape[1])
            end = torch.where(targets == ids.depth_end, position, -1).max(1, keepdim=True).values
            answer = (targets != IGNORE_INDEX) & (position > end) & (end >= 0)
            token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
            losses += (token_loss * answer).sum(1).tolist()
            predicted = logits.argmax(-1)
            letter = answer & torch.isin(targets, letter_ids)
            for row in range(len(targets)):
                where = letter[row].nonzero()
                if len(where) == 0:
                    raise ValueError("an L5 answer holds no marker letter after the depth span")
                hits.append(bool(predicted[row, where[0, 0]] == targets[row, where[0, 0]]))
            codes = (targets >= ids.code_ids.start) & (targets < ids.code_ids.stop)
            code_hits += (predicted == targets)[codes].tolist()
    model.train(was_training)
    return {
        "accuracy": float(np.mean(hits)),
        "loss": float(np.mean(losses)),
        "code_accuracy": float(np.mean(code_hits)),
    }


def _segmentation_scores(model, batches: list[dict[str, Any]], *, shuffle: bool) -> dict[str, float]:  # noqa: ANN001
    """L6: cIoU over the batches' objects at the mask decoder's resolution, and the mean loss."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    inter = union = 0.0
    losses = []
    with torch.no_grad():
        for batch in batches:
            if shuffle:
                batch = dict(batch)
                batch["pixel_values"] = torch.roll(batch["pixel_values"], 1, dims=0)
                batch["sam_pixel_values"] = torch.roll(batch["sam_pixel_values"], 1, dims=0)
            out = model(**batch)
            losses.append(float(out.loss))
            for logits, target in zip(out.mask_logits or [], batch["gt_masks"], strict=True):
                if logits is None or target is None:
                    continue
                truth = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest-exact")[:, 0] > 0.5
                predicted = logits > 0
                inter += float((predicted & truth).sum())
                union += float((predicted | truth).sum())
    model.train(was_training)
    return {"accuracy": inter / union if union else 0.0, "loss": float(np.mean(losses))}


def _letter_prior(train, val) -> float:  # noqa: ANN001 - the TrainingData datasets of L5
    """The majority answer per number of markers (from the training questions), scored on the validation ones."""
    as_items = [
        [LadderItem(None, "", sample.answer, str(len(sample.letters))) for sample in samples]
        for samples in (train, val)
    ]
    return answer_prior(*as_items)


def _run_perceptio_job(config: GroundingConfig, level: str, arm: str, seed: int) -> dict[str, Any]:
    """L5 and L6: one dataset of the world, the full Perceptio forward and loss (spatial tokens included)."""
    import torch

    from perceptio.train.data import collate
    from perceptio.train.optim import build_optimizer, warmup_cosine

    began = time.perf_counter()
    model, processor = build_ladder_model(config, arm, seed)
    if level == "L5":
        model.load_depth_tokenizer(config.tokenizer)  # type: ignore[arg-type]
    else:
        model.load_segmenter(config.segmenter)  # type: ignore[arg-type]
        model.set_seg_multimask(False)  # the pretrained tiny SAM2 trains its single-mask output
    model.freeze_frozen_parts()
    train = _world_data(config, model, level, "train", config.train_images)
    val = _world_data(config, model, level, "val", config.val_images)
    rng = np.random.default_rng(seed)
    val_examples = [val.example("data", i, rng) for i in range(len(val.datasets["data"]))]
    if level == "L5":  # one phrasing, so that the first letter after the span is the answer ("Point B..." is not)
        end = val.vocab.depth_end_token
        val_examples = [
            replace(e, target=e.target[: e.target.index(end) + len(end)] + f" ({sample.answer})")
            for e, sample in zip(val_examples, val.datasets["data"], strict=True)
        ]
    val_batches = [collate(val_examples[i : i + 16], processor) for i in range(0, len(val_examples), 16)]
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, round(0.05 * config.steps))
    size = len(train.datasets["data"])
    letters = _letter_ids(processor.text_tokenizer)
    curve = []

    def evaluate(step: int) -> None:
        if level == "L5":
            right = _span_scores(model, val_batches, letters, shuffle=False)
            shuffled = _span_scores(model, val_batches, letters, shuffle=True)
            swapped = _span_scores(model, val_batches, letters, shuffle=False, swap=True)
            extra = {
                "code_accuracy": right["code_accuracy"],
                "swapped_accuracy": swapped["accuracy"],
                "span_use_gap": swapped["loss"] - right["loss"],
            }
        else:
            right = _segmentation_scores(model, val_batches, shuffle=False)
            shuffled = _segmentation_scores(model, val_batches, shuffle=True)
            extra = {}
        curve.append(
            {
                "step": step,
                "accuracy": right["accuracy"],
                "loss": right["loss"],
                "shuffled_accuracy": shuffled["accuracy"],
                "shuffled_loss": shuffled["loss"],
                "image_use_gap": shuffled["loss"] - right["loss"],
                **extra,
            }
        )

    evaluate(0)
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup_cosine(
                step, warmup_steps=warmup, total_steps=config.steps, min_lr_ratio=0.1
            )
        examples = [train.example("data", int(i), rng) for i in rng.integers(0, size, config.batch_size)]
        loss = model(**collate(examples, processor)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"level {level}, arm {arm}, seed {seed}: non-finite loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            evaluate(step + 1)
    return {
        "level": level,
        "arm": arm,
        "seed": seed,
        "options": ARMS[arm],
        # L6 has no answer prior: its reference is the point-prompted SAM2
        "prior": _letter_prior(train.datasets["data"], val.datasets["data"]) if level == "L5" else None,
        "curve": curve,
        "final": curve[-1],
        "seconds": round(time.perf_counter() - began, 1),
    }


# ---------------------------------------------------------------------------------------------- the ladder


def _job_settings(config: GroundingConfig, level: str, arm: str, seed: int) -> dict[str, Any]:
    keep = (
        "steps",
        "eval_every",
        "batch_size",
        "lr",
        "train_images",
        "val_images",
        "object_px",
        "image_size",
        "preset",
    )
    settings = {k: getattr(config, k) for k in keep}
    settings.update(level=level, arm=arm, options=ARMS[arm], seed=seed)
    if "init" in ARMS[arm]:
        settings["base"] = base_fingerprint(config.base)
    if level in WORLD_LEVELS or level in PERCEPTIO_LEVELS:
        settings["world"] = str(Path(config.world).resolve())  # type: ignore[arg-type]
    if level == "L5":
        settings["tokenizer"] = str(Path(config.tokenizer).resolve())  # type: ignore[arg-type]
    if level == "L6":
        settings["segmenter"] = str(Path(config.segmenter).resolve())  # type: ignore[arg-type]
    return settings


def _stored(path: Path, digest: str) -> dict[str, Any] | None:
    """The result a job stored in ``path``, when it was made with the settings of ``digest``; else None."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    return stored["result"] if stored.get("digest") == digest else None


def _run_and_store(config: GroundingConfig, level: str, arm: str, seed: int, path: Path, digest: str) -> None:
    """A job's process: train, then write the result with its settings digest, atomically, so that a job killed
    on the way leaves nothing to reuse."""
    result = run_job(config, level, arm, seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"digest": digest, "result": result}, indent=1) + "\n")
    tmp.replace(path)


def _outcome(level: str, result: dict[str, Any]) -> str:
    """A finished job's line: its final score, the answer prior, the image-use gap and its time."""
    final = result["final"]
    return (
        f"{'cIoU' if level == 'L6' else 'accuracy'} {final['accuracy']:.3f} "
        f"(prior {'-' if result['prior'] is None else format(result['prior'], '.3f')}), "
        f"image-use gap {final['image_use_gap']:+.3f}, {result['seconds']:.0f} s"
    )


def _job(config: GroundingConfig, level: str, arm: str, seed: int, path: Path, digest: str) -> Job:
    """The (level, arm, seed) job: done once ``path`` holds its result under ``digest``; its log lies beside."""
    return Job(
        f"{level} {arm} seed {seed}",
        partial(_run_and_store, config, level, arm, seed, path, digest),
        path.with_suffix(".log"),
        done=lambda: _stored(path, digest) is not None,
        outcome=lambda: _outcome(level, json.loads(path.read_text())["result"]),
    )


def run_grounding(config: GroundingConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every (level, arm, seed) job; write ``results.json`` and ``results.md`` under ``config.out``."""
    out = Path(config.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    planned = {
        (level, arm, seed): (
            out / "jobs" / f"{level}-{arm}-s{seed}.json",
            settings_digest(_job_settings(config, level, arm, seed)),
        )
        for level in config.levels
        for arm in config.arms
        for seed in range(config.seeds)
    }
    jobs = [_job(config, *key, path, digest) for key, (path, digest) in planned.items()]
    if pending := sum(not job.done() for job in jobs):
        echo(f"{pending} job(s) to run, {min(config.jobs, pending)} at a time")
    run_jobs(jobs, config.jobs, echo=echo)
    results = [json.loads(path.read_text())["result"] for path, _ in planned.values()]
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, "jobs": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "results.md").write_text(results_table(results, config) + "\n")
    plot_curves(results, config).save(out / "results.png")
    return summary


def plot_curves(results: Sequence[dict[str, Any]], config: GroundingConfig):  # noqa: ANN201 - PIL.Image.Image
    """Accuracy (L6: cIoU) against steps, one panel per level, one line per arm (mean over seeds), the answer prior
    dashed."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from PIL import Image

    from perceptio.utils.viz import LINE_COLORS

    levels = [level for level in config.levels if any(r["level"] == level for r in results)]
    columns = min(3, max(1, len(levels)))
    rows = -(-max(1, len(levels)) // columns)
    figure = Figure(figsize=(3.6 * columns, 2.8 * rows + 0.5), dpi=100)
    handles: dict[str, Any] = {}
    for k, level in enumerate(levels):
        axes = figure.add_subplot(rows, columns, k + 1)
        axes.set_title(f"{level} {LEVELS[level]}"[:48], fontsize=8, loc="left")
        axes.set_xlabel("step", fontsize=8)
        axes.set_ylim(0, 100)
        axes.tick_params(labelsize=7)
        axes.grid(True, color="#e6e6e6", linewidth=0.8)
        for j, arm in enumerate(config.arms):
            group = [r for r in results if r["level"] == level and r["arm"] == arm]
            if not group:
                continue
            steps = sorted({p["step"] for r in group for p in r["curve"]})
            means = [np.mean([100 * p["accuracy"] for r in group for p in r["curve"] if p["step"] == s]) for s in steps]
            color = tuple(c / 255 for c in LINE_COLORS[j % len(LINE_COLORS)])
            (handles[arm],) = axes.plot(steps, means, color=color, linewidth=1.8, label=arm)
        prior = next((r["prior"] for r in results if r["level"] == level), None)
        if prior is not None:
            handles["answer prior"] = axes.axhline(100 * prior, color="#777777", linestyle="--", linewidth=1)
        if k % columns == 0:
            axes.set_ylabel("accuracy (%; L6: cIoU)", fontsize=8)
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncols=len(handles), fontsize=8)
    figure.tight_layout(rect=(0, 0.08 / rows, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def results_table(results: Sequence[dict[str, Any]], config: GroundingConfig) -> str:
    """A Markdown table: one row per level, one column per arm: final accuracy (mean over seeds, with spread)
    and the image-use gap; the answer prior in its own column."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["level"], r["arm"]), []).append(r)
    header = ["level", "prior", *config.arms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for level in config.levels:
        runs = [r for arm in config.arms for r in by.get((level, arm), [])]
        if not runs:
            continue
        prior = runs[0]["prior"]
        cells = [f"{level} {LEVELS[level]}", "-" if prior is None else f"{100 * prior:.1f}"]
        for arm in config.arms:
            group = by.get((level, arm), [])
            if not group:
                cells.append("-")
                continue
            acc = [100 * r["final"]["accuracy"] for r in group]
            gap = np.mean([r["final"]["image_use_gap"] for r in group])
            spread = f" ± {np.std(acc):.1f}" if len(acc) > 1 else ""
            span = ""
            if level == "L5":
                span = f", span gap {np.mean([r['final']['span_use_gap'] for r in group]):+.2f}"
            cells.append(f"{np.mean(acc):.1f}{spread} (gap {gap:+.2f}{span})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "L5's span gap: val answer loss with the depth spans swapped across the batch minus with the right ones "
        "(0: the letter does not read the span). L6 reports cIoU (%) of the segmentation-token masks instead of "
        "accuracy. "
        f"Accuracy (%) on {config.val_images} val questions after {config.steps} steps of batch {config.batch_size}, "
        f"lr {config.lr}, {config.seeds} seed(s); gap = val loss with shuffled images minus with the right ones "
        "(nats per question; 0: the image is not used)."
    )
    lines += ["", "Accuracy (%; L6: cIoU) against steps, mean over seeds:", ""]
    steps = sorted({point["step"] for r in results for point in r["curve"]})
    lines += ["| level | arm | " + " | ".join(str(s) for s in steps) + " |", "|" + "---|" * (len(steps) + 2)]
    for level in config.levels:
        for arm in config.arms:
            group = by.get((level, arm), [])
            if not group:
                continue
            cells = []
            for step in steps:
                values = [100 * p["accuracy"] for r in group for p in r["curve"] if p["step"] == step]
                cells.append(f"{np.mean(values):.1f}" if values else "-")
            lines.append(f"| {level} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
