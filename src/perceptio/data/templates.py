"""How each sample becomes a prompt and a target: the one place that decides the answer format.

Order: one segmentation token per referred object, then the depth span (when the task is spatial
and ``spatial_cot`` is on), then the answer text. With ``spatial_cot=False`` (direct answering, the ablation of
the spatial chain of thought) no depth span is written; the segmentation token stays for referring
segmentation, as in Sa2VA, since masks come from it.

Several phrasings per task (as Sa2VA and LISA do) are drawn with the caller's generator, so a seeded run always
renders the same text. Token strings come from :class:`perceptio.vocab.PerceptionVocab`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from perceptio.data.schema import Sample, Task
from perceptio.errors import UserError
from perceptio.vocab import PerceptionVocab

__all__ = ["DEPTH_QUERY", "RenderedSample", "TemplateError", "evaluation_query", "render_sample", "segmentation_query"]

_SEGMENT_QUERIES = (
    "Please segment {expr} in this image.",
    "Can you segment {expr}?",
    "Where is {expr}? Please output its segmentation mask.",
)
_SEGMENT_ANSWERS = ("Sure, it is segmented.", "Here it is.", "This is the mask.")
_DEPTH_QUERIES = (
    "What is the depth map for the image?",
    "Please generate the depth map of this image.",
    "Estimate the depth of this image.",
)
_COT_ANSWERS = (
    "The answer is ({letter}).",
    "Point {letter} is the closest, so the answer is ({letter}).",
    "({letter})",
)
_MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."


class TemplateError(UserError, ValueError):
    """A sample that lacks what its task's template needs."""


@dataclass(frozen=True)
class RenderedSample:
    """A sample as text: ``query`` for the user turn, ``target`` for the assistant, and how many masks the target's
    segmentation tokens stand for (in order)."""

    query: str
    target: str
    num_masks: int


def _span(vocab: PerceptionVocab, codes: np.ndarray | None, sample: Sample) -> str:
    if codes is None:
        raise TemplateError(
            f"sample {sample.sample_id} ({sample.task.value}) needs depth codes for its depth span; "
            "encode its depth map with the depth tokenizer first, or render with spatial_cot=False"
        )
    return vocab.render_depth_span(codes)


def render_sample(
    sample: Sample,
    vocab: PerceptionVocab,
    rng: np.random.Generator,
    *,
    depth_codes: np.ndarray | None = None,
    spatial_cot: bool = True,
) -> RenderedSample:
    """Render one sample.

    Args:
        sample: any sample the readers produce.
        vocab: the perception vocabulary (its grid fixes the span length).
        rng: draws the phrasing.
        depth_codes: (h, w) codes of the sample's depth map, for tasks that write a depth span.
        spatial_cot: write the depth span before the answer on spatial tasks (False: answer directly).
    """

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    task = sample.task
    if task is Task.REFERRING_SEGMENTATION:
        parts = [vocab.seg_token * max(1, len(sample.masks))]
        if spatial_cot and depth_codes is not None:
            parts.append(_span(vocab, depth_codes, sample))
        parts.append(pick(_SEGMENT_ANSWERS))
        query = _query(sample, pick)  # drawn after the answer: the order of draws fixes a seeded run's text
        return RenderedSample(query, " ".join(parts), num_masks=max(1, len(sample.masks)))
    if task is Task.DEPTH:
        return RenderedSample(_query(sample, pick), _span(vocab, depth_codes, sample), num_masks=0)
    if task is Task.RELATIVE_DEPTH:
        if sample.answer is None:
            raise TemplateError(f"sample {sample.sample_id} has no gold letter to train on")
        if not spatial_cot:
            return RenderedSample(_query(sample, pick), f"({sample.answer})", num_masks=0)
        answer = pick(_COT_ANSWERS).format(letter=sample.answer)
        return RenderedSample(_query(sample, pick), f"{_span(vocab, depth_codes, sample)} {answer}", num_masks=0)
    if task is Task.MULTIPLE_CHOICE:
        if sample.answer is None:
            raise TemplateError(f"sample {sample.sample_id} needs choices and a gold letter")
        return RenderedSample(_query(sample, pick), sample.answer, num_masks=0)
    if task is Task.VQA:
        if sample.answer is None:
            raise TemplateError(f"sample {sample.sample_id} has no answer to train on")
        return RenderedSample(_query(sample, pick), sample.answer, num_masks=0)
    raise TemplateError(f"no template for task {task!r}")


def _query(sample: Sample, pick: Callable[[tuple[str, ...]], str]) -> str:
    """The user turn of a sample; ``pick`` chooses among the phrasings."""
    task = sample.task
    if task is Task.REFERRING_SEGMENTATION:
        if not sample.query:
            raise TemplateError(f"sample {sample.sample_id} has no referring expression")
        return pick(_SEGMENT_QUERIES).format(expr=sample.query)
    if task is Task.DEPTH:
        return pick(_DEPTH_QUERIES)
    if task is Task.MULTIPLE_CHOICE:
        if not sample.choices:
            raise TemplateError(f"sample {sample.sample_id} needs choices and a gold letter")
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(sample.letters, sample.choices, strict=False))
        hint = f"Hint: {sample.meta['hint']}\n" if sample.meta.get("hint") else ""
        return f"{hint}{sample.query}\n{options}\n{_MCQ_SUFFIX}"
    if task is Task.VQA:
        return sample.query.replace("<image>", "").strip()
    if task is Task.RELATIVE_DEPTH:
        return sample.query
    raise TemplateError(f"no template for task {task!r}")


def segmentation_query(expression: str) -> str:
    """The evaluation prompt of referring segmentation: "Please segment {expr} in this image." (LISA, Sa2VA)."""
    return _SEGMENT_QUERIES[0].format(expr=expression)


#: The evaluation prompt of depth generation.
DEPTH_QUERY = _DEPTH_QUERIES[0]


def evaluation_query(sample: Sample) -> str:
    """The prompt a benchmark asks: the training template's first phrasing (referring segmentation: "Please
    segment {expr} in this image.", as LISA and Sa2VA evaluate; depth: "What is the depth map for the image?"),
    so evaluation and training share one set of templates."""
    return _query(sample, lambda options: options[0])
