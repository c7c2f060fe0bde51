"""The settings of one evaluation run (``perceptio eval``'s options), below the runner and the task modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EvalSettings"]


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation run.

    Attributes:
        task: one of :data:`TASKS`.
        model: the model folder.
        data: refcoco: the refer root (with ``refs(*).p``); hardblink: the folder with ``questions/``; blink: the
            parquet file or BLINK root; mmbench: the ``.tsv``; depth: a depth folder or a synthetic world.
        out: the output folder.
        split: the split (refcoco: val/testA/testB/test; blink: val/test; depth with a world: its split).
        dataset: refcoco, refcoco+ or refcocog (refcoco only).
        image_root: images, when not found next to the annotations.
        limit: only the first N samples (MMBench: the first N questions with all their circular copies;
            HardBLINK/BLINK: N questions spread evenly over the point counts).
        batch_size: prompts per generation batch.
        resume: keep the samples already in ``predictions.jsonl``.
        spatial_cot: let the model write a depth span before its answer (False: ban it, answer directly); None:
            the model's own setting (``config.spatial_cot``, what it was trained to do).
        constrain: constrain the depth-span grammar while decoding, so every span is well-formed; None: the
            model's setting (``config.constrain``, on unless changed).
        span_window: depth-span tokens decoded per forward (exact parallel decoding; 1: one at a time).
        compile: ``torch.compile`` the decoding step (pays off over long evaluations).
        first_mask: refcoco only: score the mask of each answer's first segmentation token alone, and end the
            answer there (its mask is the full answer's: the tokens before it do not depend on what follows). Several
            times faster, since the depth span and text are not written; the default (False) writes whole answers
            and OR-s the masks of all their segmentation tokens.
        device: cpu or cuda (default: cuda when available).
    """

    task: str
    model: Path
    data: Path
    out: Path
    split: str | None = None
    dataset: str = "refcoco"
    image_root: Path | None = None
    limit: int | None = None
    batch_size: int = 8
    resume: bool = False
    spatial_cot: bool | None = None
    constrain: bool | None = None
    span_window: int = 16
    compile: bool = False
    first_mask: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        from perceptio.eval.tasks import get_task  # the registry imports this module's users

        get_task(self.task)  # an unknown name is an error listing the known ones
        if self.batch_size < 1 or self.span_window < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("batch_size, span_window and limit must be at least 1")
        if self.first_mask and self.task != "refcoco":
            raise ValueError(f"first_mask is for the refcoco task (its masks are scored), not {self.task!r}")
