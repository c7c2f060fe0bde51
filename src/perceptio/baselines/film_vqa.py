"""A FiLM CNN trained directly on the synthetic world's VQA questions: how hard the split is without a VLM.

The model follows FiLM (Perez et al., 2018) at a small scale: a GRU reads the question, a two-layer strided CNN
reads the image with x/y coordinate channels, and four residual blocks modulate the image features with a
per-channel scale and shift predicted from the question. A classifier over the answers seen in training reads the
max-pooled features together with the question vector. It is trained from scratch on ``vqa/train.json`` and scored
on ``vqa/val.json`` with the project's short-answer normalisation, so its accuracy can be read next to the VLM's.

Everything runs on the CPU with ``config.threads`` threads; images are decoded once and kept as uint8 at
``config.image_size``.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from perceptio.data.schema import Sample

__all__ = ["FilmBaselineConfig", "FilmVQA", "train_film_baseline"]

# The same constants as perceptio.models.processing; repeated here so that the baseline does not import transformers.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PAD, _UNKNOWN = 0, 1
_WORD = re.compile(r"\w+")
_NO_CATEGORY = "other"


@dataclass(frozen=True)
class FilmBaselineConfig:
    """Model size and optimisation of the FiLM baseline.

    Attributes:
        image_size: side in pixels the images are resized to (bicubic).
        steps: optimiser steps, each on a random minibatch of training questions.
        batch_size: questions per training step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        width: channels of the CNN (``d``).
        seed: seeds the weight initialisation and the minibatch order.
        threads: torch CPU threads used while training and evaluating (the previous setting is restored after).
        eval_batch_size: questions per forward pass during evaluation.
    """

    image_size: int = 64
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    width: int = 48
    seed: int = 0
    threads: int = 1
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("image_size", "steps", "batch_size", "width", "threads", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FilmBaselineConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size < 4:
            raise ValueError(f"FilmBaselineConfig.image_size must be at least 4, got {self.image_size}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"FilmBaselineConfig.seed must be a non-negative integer, got {self.seed!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"FilmBaselineConfig.lr must be a positive number, got {self.lr!r}")
        wd = self.weight_decay
        if not (isinstance(wd, int | float) and math.isfinite(wd) and wd >= 0):
            raise ValueError(f"FilmBaselineConfig.weight_decay must be a non-negative number, got {wd!r}")


# ------------------------------------------------------------------------------------------------------ model


def _with_coords(features: torch.Tensor) -> torch.Tensor:
    """``features`` (B, C, H, W) with two more channels: x and y, each running from -1 to 1 across the map."""
    b, _, h, w = features.shape
    ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=features.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=features.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack((grid_x, grid_y)).expand(b, 2, h, w)
    return torch.cat((features, coords), dim=1)


class _FilmBlock(nn.Module):
    """``h + relu(bn(conv([h, x, y])) * (1 + gamma) + beta)`` with ``gamma, beta`` predicted from the question."""

    def __init__(self, width: int, question_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width + 2, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width, affine=False)
        self.film = nn.Linear(question_dim, 2 * width)

    def forward(self, features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(question)[:, :, None, None].chunk(2, dim=1)
        r = self.norm(self.conv(_with_coords(features)))
        return features + F.relu(r * (1 + gamma) + beta)


class FilmVQA(nn.Module):
    """A small FiLM network that classifies (image, question) pairs into a fixed set of answers.

    Args:
        vocab_size: question vocabulary size, padding (index 0) and unknown (index 1) included.
        num_answers: number of answer classes.
        width: channels of the CNN.
        embed_dim: word embedding size.
        question_dim: GRU hidden size (the question vector).
        blocks: number of residual FiLM blocks.
        head_dim: hidden size of the classifier MLP.
    """

    def __init__(
        self,
        vocab_size: int,
        num_answers: int,
        *,
        width: int = 48,
        embed_dim: int = 64,
        question_dim: int = 128,
        blocks: int = 4,
        head_dim: int = 256,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or num_answers < 1:
            raise ValueError(f"need vocab_size >= 2 and num_answers >= 1, got {vocab_size} and {num_answers}")
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=_PAD)
        self.gru = nn.GRU(embed_dim, question_dim, batch_first=True)
        self.stem = nn.Sequential(
            nn.Conv2d(3 + 2, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.blocks = nn.ModuleList(_FilmBlock(width, question_dim) for _ in range(blocks))
        self.head = nn.Sequential(
            nn.Linear(width + question_dim, head_dim),
            nn.ReLU(),
            nn.Linear(head_dim, num_answers),
        )

    def encode_question(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The GRU's hidden state after the last valid token: (B, question_dim) from tokens (B, L), lengths (B,)."""
        outputs, _ = self.gru(self.embed(tokens))
        last = (lengths.to(tokens.device).clamp(1, tokens.shape[1]) - 1).long()
        return outputs[torch.arange(tokens.shape[0], device=tokens.device), last]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Answer logits (B, num_answers).

        Args:
            images: (B, 3, H, W) normalised images.
            tokens: (B, L) word indices, right-padded with 0.
            lengths: (B,) number of valid tokens of each question.
        """
        question = self.encode_question(tokens, lengths)
        features = self.stem(_with_coords(images))
        for block in self.blocks:
            features = block(features, question)
        pooled = features.amax(dim=(2, 3))
        return self.head(torch.cat((pooled, question), dim=1))


# ------------------------------------------------------------------------------------------------------- data


def _words(query: str) -> list[str]:
    """Lower-case words of a question, the ``<image>`` placeholder left out."""
    return _WORD.findall(query.replace("<image>", " ").lower())


def _category(sample: Sample) -> str:
    category = sample.meta.get("category")
    return str(category) if category else _NO_CATEGORY


@dataclass
class _Encoded:
    """Questions as tensors: token indices, lengths, which decoded image each one asks about, and answers."""

    tokens: torch.Tensor  # (N, L) long, right-padded with _PAD
    lengths: torch.Tensor  # (N,) long
    image_index: torch.Tensor  # (N,) long, into the shared image tensor
    answers: torch.Tensor  # (N,) long answer class, -1 where the answer was never seen in training


def _load_images(samples: Sequence[Sample], size: int, *, progress: bool) -> tuple[torch.Tensor, dict[str, int]]:
    """Each distinct image of ``samples`` decoded once, resized to ``size`` (bicubic): uint8 (I, 3, size, size)."""
    index: dict[str, int] = {}
    arrays: list[np.ndarray] = []
    for sample in tqdm(samples, desc="film: images", unit="q", disable=not progress):
        key = sample.image.describe()
        if key in index:
            continue
        image = sample.image.load().resize((size, size), Image.Resampling.BICUBIC)
        index[key] = len(arrays)
        arrays.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)), index


def _encode(
    samples: Sequence[Sample],
    vocab: dict[str, int],
    answer_classes: dict[str, int],
    image_index: dict[str, int],
) -> _Encoded:
    from perceptio.eval.extract import normalize_answer

    questions = [[vocab.get(word, _UNKNOWN) for word in _words(s.query)] for s in samples]
    longest = max([1, *(len(q) for q in questions)])
    tokens = torch.full((len(samples), longest), _PAD, dtype=torch.long)
    for row, question in enumerate(questions):
        tokens[row, : len(question)] = torch.tensor(question, dtype=torch.long)
    return _Encoded(
        tokens=tokens,
        lengths=torch.tensor([len(q) for q in questions], dtype=torch.long),
        image_index=torch.tensor([image_index[s.image.describe()] for s in samples], dtype=torch.long),
        answers=torch.tensor([answer_classes.get(normalize_answer(s.answer or ""), -1) for s in samples]),
    )


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) to float with ImageNet mean and std."""
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _read_split(world: Path, split: str) -> list[Sample]:
    from perceptio.data.readers import read_conversations

    path = world / "vqa" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {world} is not a rendered synthetic world with VQA questions; "
            "render a world with `perceptio data synth`"
        )
    return [s for s in read_conversations(path, image_root=world / "images", split=split) if s.answer is not None]


# ---------------------------------------------------------------------------------------------------- training


@torch.no_grad()
def _predict(model: FilmVQA, images: torch.Tensor, data: _Encoded, batch_size: int) -> torch.Tensor:
    model.eval()
    predictions = []
    for start in range(0, len(data.answers), batch_size):
        rows = slice(start, start + batch_size)
        logits = model(_normalise(images[data.image_index[rows]]), data.tokens[rows], data.lengths[rows])
        predictions.append(logits.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def train_film_baseline(
    world: Path, config: FilmBaselineConfig = FilmBaselineConfig(), *, progress: bool = False
) -> dict[str, Any]:
    """Train a :class:`FilmVQA` on a synthetic world's VQA train split and score it on the val split.

    Questions are lower-cased ``\\w+`` words (the ``<image>`` placeholder removed); the vocabulary and the answer
    classes come from the train split only, so an unknown val word maps to the unknown token and a val question
    whose (normalised) answer never occurs in training counts as wrong. Answers are compared after
    :func:`perceptio.eval.extract.normalize_answer`, as the project's VQA scoring does.

    Args:
        world: a folder written by ``perceptio data synth`` (it needs ``vqa/train.json``, ``vqa/val.json`` and
            ``images/``).
        config: model size and optimisation.
        progress: show tqdm progress bars.

    Returns:
        ``{"accuracy", "by_category": {name: {"accuracy", "count"}}, "steps", "seconds" (wall time of the whole
        call, image decoding included), "train_questions", "val_questions", "parameters", "answer_classes",
        "val_unseen_answers" (val questions whose answer is not a class), "train_loss" (mean over the last
        50 steps), "config"}``.

    Raises:
        FileNotFoundError: ``vqa/train.json`` or ``vqa/val.json`` is missing.
        ValueError: the train split has no answered questions.
    """
    from perceptio.eval.extract import normalize_answer

    began = time.perf_counter()
    world = Path(world)
    train_samples = _read_split(world, "train")
    val_samples = _read_split(world, "val")
    if not train_samples:
        raise ValueError(f"{world / 'vqa' / 'train.json'} has no answered questions; render a larger world")

    words = sorted({word for s in train_samples for word in _words(s.query)})
    vocab = {word: i for i, word in enumerate(words, start=2)}  # 0: padding, 1: unknown
    answers = sorted({normalize_answer(s.answer or "") for s in train_samples})
    answer_classes = {answer: i for i, answer in enumerate(answers)}

    images, image_index = _load_images([*train_samples, *val_samples], config.image_size, progress=progress)
    train = _encode(train_samples, vocab, answer_classes, image_index)
    val = _encode(val_samples, vocab, answer_classes, image_index) if val_samples else None

    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = FilmVQA(len(vocab) + 2, len(answer_classes), width=config.width)
        optimizer = torch.optim.AdamW(  # foreach: bit-identical to the per-tensor loop, fewer calls
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True
        )
        generator = torch.Generator().manual_seed(config.seed)
        losses: list[float] = []
        model.train()
        bar = tqdm(range(config.steps), desc="film: train", unit="step", disable=not progress)
        for step in bar:
            rows = torch.randint(0, len(train.answers), (config.batch_size,), generator=generator)
            logits = model(_normalise(images[train.image_index[rows]]), train.tokens[rows], train.lengths[rows])
            loss = F.cross_entropy(logits, train.answers[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        bar.close()
        predictions = _predict(model, images, val, config.eval_batch_size) if val is not None else None
    finally:
        torch.set_num_threads(old_threads)

    correct = (predictions == val.answers).tolist() if val is not None and predictions is not None else []
    totals: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for sample, ok in zip(val_samples, correct, strict=True):
        totals[_category(sample)] += 1
        hits[_category(sample)] += int(ok)
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "by_category": {
            name: {"accuracy": hits[name] / totals[name], "count": totals[name]} for name in sorted(totals)
        },
        "steps": config.steps,
        "seconds": time.perf_counter() - began,
        "train_questions": len(train_samples),
        "val_questions": len(val_samples),
        "parameters": sum(p.numel() for p in model.parameters()),
        "answer_classes": len(answer_classes),
        "val_unseen_answers": int((val.answers < 0).sum()) if val is not None else 0,
        "train_loss": float(np.mean(losses[-50:])),
        "config": asdict(config),
    }
