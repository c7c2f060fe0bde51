"""Relative depth (HardBLINK, BLINK): which marked point is the closest, as a letter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perceptio.data.errors import DataError
from perceptio.data.readers import read_blink, read_hardblink
from perceptio.data.schema import Sample
from perceptio.eval.metrics import RelativeDepthMeter
from perceptio.eval.tasks.base import EvalTask, letter_score, register

__all__ = ["BLINK", "HardBLINK", "balance_point_counts"]


def balance_point_counts(samples: list[Sample], limit: int) -> list[Sample]:
    """At most ``limit`` questions taken round-robin over the point counts, in the original order within each
    count: the readers order questions by point count, so a plain prefix would drop whole counts."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:  # the count of lettered options: real HardBLINK has no marker coordinates, only letters
        groups.setdefault(len(sample.letters), []).append(sample)
    kept: set[int] = set()  # positions in ``samples``
    position = {id(sample): k for k, sample in enumerate(samples)}
    for rank in range(max(len(group) for group in groups.values()) if groups else 0):
        for _, group in sorted(groups.items()):
            if rank < len(group) and len(kept) < limit:
                kept.add(position[id(group[rank])])
    return [samples[k] for k in sorted(kept)]


def _programmatic(sample: Sample, prediction) -> str | None:  # noqa: ANN001
    """The marker with the largest decoded value (1 = nearest) at its coordinates, when both are known."""
    if prediction.depth is None or not sample.points:
        return None
    h, w = prediction.depth.shape
    values = [prediction.depth[min(h - 1, max(0, int(p.y))), min(w - 1, max(0, int(p.x)))] for p in sample.points]
    return sample.points[int(np.argmax(values))].label


class _RelativeDepth(EvalTask):
    """Letter accuracy per point count and their mean, with the deterministic extraction of
    :func:`perceptio.eval.extract.parse_answer` (unparsable and out-of-range answers are wrong); where the question
    carries its marker coordinates and the model wrote a depth span, also the "programmatic" accuracy read off the
    decoded depth map at the markers, and how often the written letter agrees with it."""

    def select(self, samples: list[Sample], limit: int) -> list[Sample]:
        return balance_point_counts(samples, limit)

    def score(self, sample, prediction, context, model) -> dict[str, Any]:  # noqa: ANN001
        programmatic = _programmatic(sample, prediction)
        return {
            **letter_score(sample, prediction.answer),
            "point_count": len(sample.letters),
            "programmatic": programmatic,
            "programmatic_correct": None if programmatic is None else programmatic == sample.answer,
        }

    def summarize(self, scores, samples) -> dict[str, Any]:  # noqa: ANN001
        answers, programmatic = RelativeDepthMeter(), RelativeDepthMeter()
        for s in scores:
            answers.add(s["point_count"], bool(s["correct"]), parsed=s["letter"] is not None)
            if s["programmatic"] is not None:
                programmatic.add(s["point_count"], bool(s["programmatic_correct"]))
        result: dict[str, Any] = {
            "answer": answers.result(),
            "programmatic": programmatic.result() if programmatic.point_counts else None,
        }
        result["unparsed_rate"] = float(np.mean([s["letter"] is None for s in scores])) if scores else None
        # does the written letter follow from the model's own span? (questions whose span could be read)
        read = [s for s in scores if s["programmatic"] is not None]
        agree = [s["letter"] == s["programmatic"] for s in read]
        result["letter_span_agreement"] = float(np.mean(agree)) if read else None
        result["span_read_rate"] = len(read) / len(scores) if scores else None
        return result


@register
class HardBLINK(_RelativeDepth):
    name = "hardblink"
    data_help = "the HardBLINK folder (questions/, answers/, images/) or a synthetic world's hardblink/<split>"

    def load(self, settings) -> list[Sample]:  # noqa: ANN001
        return read_hardblink(Path(settings.data), split=settings.split)


@register
class BLINK(_RelativeDepth):
    name = "blink"
    data_help = "the BLINK Relative_Depth parquet file or BLINK root (--split val: test answers are hidden)"

    def load(self, settings) -> list[Sample]:  # noqa: ANN001
        data = Path(settings.data)
        samples = [s for s in read_blink(data, split=settings.split or "val") if s.answer is not None]
        if not samples:
            raise DataError(
                "the BLINK split hides its answers", path=data, fix="evaluate on --split val (test answers are hidden)"
            )
        return samples
