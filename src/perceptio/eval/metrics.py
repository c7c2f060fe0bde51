"""Benchmark metrics as pure accumulators: referring segmentation, relative depth, MMBench (no model, no torch).

Each accumulator keeps only sums and counts, exposes them as a plain JSON-able ``state()``, and merges states by
adding them, so per-rank (or per-shard, or resumed) partial results combine into exactly the single-pass
numbers: ratios are formed once, from the summed totals, in ``result()`` (a mean of per-shard ratios would not be).

* :class:`SegmentationMeter`: cIoU and gIoU as LISA and Sa2VA compute them:
  ``cIoU = sum I / (sum U + 1e-10)`` over the split; ``gIoU = mean_i I_i / (U_i + 1e-5)`` with ``IoU_i = 1`` when
  ``U_i = 0`` (empty prediction and empty GT). Several predicted masks are OR-ed (Sa2VA); no mask is an empty
  prediction (scored, never skipped); pixels of an optional ignore mask count in neither class
  (LISA's ``ignore_index=255``).
* :class:`RelativeDepthMeter`: BLINK / HardBLINK accuracy per point count (2 = BLINK, 3/4/5 = HardBLINK) and the
  mean over point counts (AURORA's "Average" is the mean of the 2, 3, 4 and 5 columns).
* :func:`score_mmbench`: CircularEval (a question is right only if every circular copy is) and the vanilla
  single pass (copy 0 only), overall, per ``category`` and per ``l2-category``, as VLMEvalKit reports them.

Depth-map metrics (AbsRel, RMSE, delta1) are :func:`perceptio.tokenizers.depth.evaluate.depth_metrics`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from perceptio.data.formats import CIRCULAR_OFFSET
from perceptio.data.schema import Sample

__all__ = [
    "CIOU_EPS",
    "GIOU_EPS",
    "HARDBLINK_POINT_COUNTS",
    "MMBenchRecord",
    "MaskScore",
    "RelativeDepthMeter",
    "SegmentationMeter",
    "score_mmbench",
]

logger = logging.getLogger(__name__)

#: Added to the summed union before dividing (cIoU), as LISA and Sa2VA do.
CIOU_EPS = 1e-10
#: Added to each sample's union before dividing (gIoU): a perfect match scores ``1 - 1e-5 / U``, not 1.
GIOU_EPS = 1e-5
#: The HardBLINK subsets; BLINK's own relative-depth questions have 2 points.
HARDBLINK_POINT_COUNTS = (3, 4, 5)

UNKNOWN_CATEGORY = "unknown"


# ------------------------------------------------------------------------------------------ segmentation


@dataclass(frozen=True)
class MaskScore:
    """One expression's numbers: foreground intersection and union (pixels) and its gIoU term."""

    intersection: int
    union: int
    iou: float


class SegmentationMeter:
    """cIoU / gIoU over a referring-segmentation split, one :meth:`add` per referring expression.

    Args:
        combine: what to do with several predicted masks for one expression: ``"union"`` ORs them (Sa2VA),
            ``"first"`` keeps the first one only.
    """

    _COUNTERS = ("intersection", "union", "count", "empty_targets", "empty_predictions")

    def __init__(self, *, combine: Literal["union", "first"] = "union") -> None:
        if combine not in ("union", "first"):
            raise ValueError(f"combine must be 'union' or 'first', got {combine!r}")
        self.combine = combine
        self.intersection = 0
        self.union = 0
        self.iou_sum = 0.0
        self.count = 0
        self.empty_targets = 0
        self.empty_predictions = 0

    def add(
        self,
        pred_masks: Sequence[np.ndarray] | np.ndarray | None,
        gt_mask: np.ndarray,
        *,
        ignore: np.ndarray | None = None,
    ) -> MaskScore:
        """Score one expression and add it to the totals.

        Args:
            pred_masks: the predicted bool (H, W) masks at the GT's resolution: a list (possibly empty), a stacked
                (N, H, W) array, one (H, W) array, or None. No mask at all is an all-empty prediction.
            gt_mask: the bool (H, W) ground truth at the original image resolution (all False: no target).
            ignore: optional bool (H, W); these pixels count in neither prediction nor GT.

        Returns:
            This expression's intersection, union and gIoU term.

        Raises:
            ValueError: a mask that is not boolean or not 2-D, or a prediction whose shape differs from the GT's
                (predictions must be resized to the original image size before scoring, never broadcast).
        """
        gt = _check_mask(gt_mask, "gt_mask")
        prediction = self._combine(pred_masks, gt.shape)
        if ignore is not None:
            keep = ~_check_mask(ignore, "ignore", gt.shape)
            gt = gt & keep
            prediction = prediction & keep
        intersection = int(np.count_nonzero(prediction & gt))
        union = int(np.count_nonzero(prediction | gt))
        iou = 1.0 if union == 0 else intersection / (union + GIOU_EPS)
        self.intersection += intersection
        self.union += union
        self.iou_sum += iou
        self.count += 1
        self.empty_targets += int(not gt.any())
        self.empty_predictions += int(not prediction.any())
        return MaskScore(intersection=intersection, union=union, iou=iou)

    def _combine(self, pred_masks: Sequence[np.ndarray] | np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if pred_masks is None:
            masks: list[np.ndarray] = []
        elif isinstance(pred_masks, np.ndarray):
            if pred_masks.ndim not in (2, 3):
                raise ValueError(
                    f"pred_masks is an array of shape {pred_masks.shape}; pass one (H, W) mask, an (N, H, W) stack "
                    "or a list of (H, W) masks"
                )
            masks = [pred_masks] if pred_masks.ndim == 2 else list(pred_masks)
        else:
            masks = list(pred_masks)
        checked = [_check_mask(m, f"pred_masks[{k}]", shape) for k, m in enumerate(masks)]
        out = np.zeros(shape, dtype=bool)
        for mask in checked[:1] if self.combine == "first" else checked:
            out |= mask
        return out

    def state(self) -> dict[str, Any]:
        """The sums, as plain JSON-able values; sum states with :meth:`merge`, rebuild with :meth:`from_state`."""
        return {
            "combine": self.combine,
            "iou_sum": self.iou_sum,
            **{name: getattr(self, name) for name in self._COUNTERS},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SegmentationMeter:
        """A meter holding the sums of ``state`` (as written by :meth:`state`)."""
        missing = sorted({"combine", "iou_sum", *cls._COUNTERS} - set(state))
        if missing:
            raise ValueError(
                f"segmentation meter state lacks {missing}; pass a dict written by SegmentationMeter.state()"
            )
        meter = cls(combine=state["combine"])
        meter.iou_sum = float(state["iou_sum"])
        for name in cls._COUNTERS:
            setattr(meter, name, int(state[name]))
        return meter

    def merge(self, other: SegmentationMeter | Mapping[str, Any]) -> SegmentationMeter:
        """Add another meter's (or state's) sums to this one, in place; returns self."""
        other = other if isinstance(other, SegmentationMeter) else SegmentationMeter.from_state(other)
        if other.combine != self.combine:
            raise ValueError(
                f"cannot merge a combine={other.combine!r} meter into a combine={self.combine!r} one; "
                "score every shard with the same settings"
            )
        self.iou_sum += other.iou_sum
        for name in self._COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def result(self) -> dict[str, Any]:
        """``ciou``, ``giou`` (None before any sample), ``count`` and the summed pixels and empty-mask counts."""
        return {
            "ciou": self.intersection / (self.union + CIOU_EPS) if self.count else None,
            "giou": self.iou_sum / self.count if self.count else None,
            **{name: getattr(self, name) for name in self._COUNTERS},
        }


def _check_mask(mask: Any, what: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != np.bool_:
        raise ValueError(
            f"{what} has dtype {array.dtype}, expected bool; threshold mask logits at 0 (`logits > 0`) or convert "
            "a 0/1 mask with `.astype(bool)` first"
        )
    if array.ndim != 2:
        raise ValueError(f"{what} has shape {array.shape}, expected a 2-D (H, W) mask")
    if shape is not None and array.shape != shape:
        raise ValueError(
            f"{what} has shape {array.shape} but the ground truth is {shape} (H, W); resize predictions to the "
            "original image size before scoring"
        )
    return array


# ---------------------------------------------------------------------------------------- relative depth


class RelativeDepthMeter:
    """Closest-point accuracy per point count (BLINK: 2, HardBLINK: 3, 4, 5) and the mean over point counts.

    An answer that could not be parsed, or names a letter outside the item's range, is added as wrong; pass
    ``parsed=False`` as well to have it counted under ``unparsed``.
    """

    _FIELDS = ("correct", "total", "unparsed")

    def __init__(self) -> None:
        self.correct: dict[int, int] = defaultdict(int)
        self.total: dict[int, int] = defaultdict(int)
        self.unparsed: dict[int, int] = defaultdict(int)

    def add(self, point_count: int, correct: bool, *, parsed: bool = True) -> None:
        """Record one question with ``point_count`` markers."""
        if isinstance(point_count, bool) or not isinstance(point_count, int | np.integer) or point_count < 2:
            raise ValueError(f"point_count must be an integer >= 2 (the number of markers), got {point_count!r}")
        if correct and not parsed:
            raise ValueError("an unparsed answer cannot be correct; pass correct=False with parsed=False")
        n = int(point_count)
        self.total[n] += 1
        self.correct[n] += int(bool(correct))
        self.unparsed[n] += int(not parsed)

    @property
    def point_counts(self) -> list[int]:
        """The point counts seen, ascending."""
        return sorted(n for n, total in self.total.items() if total)

    def accuracy(self, point_count: int) -> float | None:
        """Accuracy on questions with ``point_count`` markers, None if there were none."""
        total = self.total.get(point_count, 0)
        return self.correct.get(point_count, 0) / total if total else None

    def mean(self, point_counts: Sequence[int] | None = None) -> float | None:
        """Unweighted mean of the per-count accuracies over ``point_counts`` (default: every count seen).

        Raises:
            ValueError: a requested point count has no questions (the mean would silently change meaning).
        """
        counts = list(point_counts) if point_counts is not None else self.point_counts
        if not counts:
            return None
        empty = [n for n in counts if not self.total.get(n, 0)]
        if empty:
            raise ValueError(f"no questions with {empty} points; the meter has {self.point_counts}")
        return float(np.mean([self.correct[n] / self.total[n] for n in counts]))

    def state(self) -> dict[str, dict[str, int]]:
        """``{"correct"|"total"|"unparsed": {"<point count>": n}}``, JSON-able; merge with :meth:`merge`."""
        return {name: {str(n): int(v) for n, v in sorted(getattr(self, name).items())} for name in self._FIELDS}

    @classmethod
    def from_state(cls, state: Mapping[str, Mapping[str | int, int]]) -> RelativeDepthMeter:
        """A meter holding the counts of ``state`` (as written by :meth:`state`; keys may be str or int)."""
        missing = [name for name in cls._FIELDS if name not in state]
        if missing:
            raise ValueError(f"relative-depth meter state lacks {missing}; pass a dict written by .state()")
        meter = cls()
        for name in cls._FIELDS:
            target = getattr(meter, name)
            for key, value in state[name].items():
                target[int(key)] += int(value)
        return meter

    def merge(self, other: RelativeDepthMeter | Mapping[str, Mapping[str | int, int]]) -> RelativeDepthMeter:
        """Add another meter's (or state's) counts to this one, in place; returns self."""
        other = other if isinstance(other, RelativeDepthMeter) else RelativeDepthMeter.from_state(other)
        for name in self._FIELDS:
            target = getattr(self, name)
            for n, value in getattr(other, name).items():
                target[n] += value
        return self

    def result(self) -> dict[str, Any]:
        """Per point count ``{accuracy, correct, total, unparsed}``, ``mean`` over every count seen (with
        ``mean_over`` naming them; AURORA's 4-column average when they are 2..5) and ``hardblink_mean`` over
        3/4/5 (None unless all three are present)."""
        counts = self.point_counts
        hardblink = all(self.total.get(n, 0) for n in HARDBLINK_POINT_COUNTS)
        return {
            "by_point_count": {
                str(n): {
                    "accuracy": self.accuracy(n),
                    "correct": self.correct[n],
                    "total": self.total[n],
                    "unparsed": self.unparsed.get(n, 0),
                }
                for n in counts
            },
            "mean": self.mean(counts),
            "mean_over": counts,
            "hardblink_mean": self.mean(HARDBLINK_POINT_COUNTS) if hardblink else None,
        }


# ------------------------------------------------------------------------------------------------ MMBench


@dataclass(frozen=True)
class MMBenchRecord:
    """One scored row of an MMBench TSV: a question or one of its CircularEval copies.

    Copies are identified as :func:`~perceptio.data.readers.read_mmbench` does: ``index = g_index + k *
    CIRCULAR_OFFSET`` for circular pass k (pass 0 is the original question).

    Attributes:
        index: the row's ``index`` (int, or a string of digits as in some TSV dumps).
        answer: the gold letter of this copy (already shifted for its pass).
        prediction: the extracted letter, or None when nothing could be extracted (scored wrong).
        category: the row's ``category`` (L3 ability).
        l2_category: the row's ``l2-category``.
    """

    index: int
    answer: str
    prediction: str | None
    category: str | None = None
    l2_category: str | None = None

    def __post_init__(self) -> None:
        index = self.index
        if isinstance(index, str) and index.strip().isdigit():
            index = int(index.strip())
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
            raise ValueError(f"MMBench index must be a non-negative integer, got {self.index!r}")
        object.__setattr__(self, "index", int(index))
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(
                f"MMBench index {self.index} has no gold answer ({self.answer!r}); test files hide the answers, "
                "so score dev files only (or submit the predictions to the evaluation server)"
            )

    @property
    def g_index(self) -> int:
        """The index of the original question this row belongs to."""
        return self.index % CIRCULAR_OFFSET

    @property
    def circular_pass(self) -> int:
        """How many times this copy's options were shifted (0 = the original question)."""
        return self.index // CIRCULAR_OFFSET

    @property
    def correct(self) -> bool:
        return self.prediction is not None and self.prediction.strip() == self.answer.strip()

    @classmethod
    def from_sample(cls, sample: Sample, prediction: str | None) -> MMBenchRecord:
        """The record of a sample read by ``read_mmbench`` and the letter extracted from the model's answer."""
        if "index" not in sample.meta:
            raise ValueError(f"sample {sample.sample_id} has no meta['index']; read it with read_mmbench")
        if sample.answer is None:
            raise ValueError(
                f"MMBench index {sample.meta['index']} has no gold answer; test files hide the answers, so score "
                "dev files only (or submit the predictions to the evaluation server)"
            )
        return cls(
            index=sample.meta["index"],
            answer=sample.answer,
            prediction=prediction,
            category=sample.meta.get("category"),
            l2_category=sample.meta.get("l2_category"),
        )


def score_mmbench(records: Iterable[MMBenchRecord], *, expected_indices: Iterable[int] | None = None) -> dict[str, Any]:
    """CircularEval and vanilla (pass-0) accuracy of MMBench predictions, overall and per category.

    Args:
        records: one record per predicted row (original questions and their circular copies).
        expected_indices: every row index of the TSV the predictions were made on (``sample.meta["index"]``).
            When given, rows without a record are **missing**; without it only gaps visible in the records
            themselves are found (a group without its pass 0, or passes 0 and 2 without 1).

    A question (``g_index`` group) counts as correct under CircularEval only if all its copies are present and
    correct. A group with a missing copy counts as a failure (as in VLMEvalKit's CircularEval), is logged as a
    warning and is listed under ``incomplete_groups``. Vanilla accuracy scores the pass-0 row of every group;
    a missing pass-0 row counts as wrong. A group's category is taken from its lowest pass present; a group
    with no record at all is counted under ``"unknown"``.

    Returns:
        ``{"circular": S, "vanilla": S, "num_questions", "num_records", "incomplete_groups", "missing_indices"}``
        where each ``S`` is ``{"accuracy", "correct", "total", "by_category": {name: {"accuracy", "correct",
        "total"}}, "by_l2_category": {...}}``; accuracies are None when there is nothing to score.

    Raises:
        ValueError: two records with the same index, or a record whose index is not in ``expected_indices``.
    """
    by_index: dict[int, MMBenchRecord] = {}
    for record in records:
        if record.index in by_index:
            raise ValueError(f"two records for MMBench index {record.index}; keep one prediction per row")
        by_index[record.index] = record

    expected_passes: dict[int, set[int]] = defaultdict(set)
    if expected_indices is not None:
        expected = {_as_index(i) for i in expected_indices}
        unexpected = sorted(set(by_index) - expected)
        if unexpected:
            raise ValueError(
                f"records for indices {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} that the dataset does "
                "not hold; score against the TSV the predictions were made on"
            )
        for index in expected:
            expected_passes[index % CIRCULAR_OFFSET].add(index // CIRCULAR_OFFSET)
        missing = sorted(expected - set(by_index))
    else:
        missing = []

    groups: dict[int, dict[int, MMBenchRecord]] = defaultdict(dict)
    for record in by_index.values():
        groups[record.g_index][record.circular_pass] = record
    for g_index in expected_passes:
        groups.setdefault(g_index, {})

    circular = _Tally()
    vanilla = _Tally()
    incomplete: list[int] = []
    for g_index in sorted(groups):
        copies = groups[g_index]
        present = set(copies)
        needed = expected_passes.get(g_index) or set(range(max(present) + 1))
        complete = needed <= present
        if not complete:
            incomplete.append(g_index)
            if expected_indices is None:  # the gaps are the only misses we can name
                missing.extend(g_index + k * CIRCULAR_OFFSET for k in sorted(needed - present))
        first = copies[min(present)] if present else None
        category = (first.category if first else None) or UNKNOWN_CATEGORY
        l2_category = (first.l2_category if first else None) or UNKNOWN_CATEGORY
        circular.add(category, l2_category, complete and all(r.correct for r in copies.values()))
        vanilla.add(category, l2_category, 0 in copies and copies[0].correct)

    if incomplete:
        shown = ", ".join(str(g) for g in incomplete[:10]) + (" ..." if len(incomplete) > 10 else "")
        logger.warning(
            "%d MMBench question(s) lack circular copies in the predictions and count as failures: g_index %s",
            len(incomplete),
            shown,
        )
    return {
        "circular": circular.result(),
        "vanilla": vanilla.result(),
        "num_questions": len(groups),
        "num_records": len(by_index),
        "incomplete_groups": incomplete,
        "missing_indices": sorted(missing),
    }


def _as_index(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"expected_indices holds {value!r}, not a non-negative integer index")
    return int(value)


class _Tally:
    """Correct/total counts overall, per category and per L2 category."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0
        self.by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.by_l2: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(self, category: str, l2_category: str, correct: bool) -> None:
        self.correct += int(correct)
        self.total += 1
        for table, key in ((self.by_category, category), (self.by_l2, l2_category)):
            table[key][0] += int(correct)
            table[key][1] += 1

    def result(self) -> dict[str, Any]:
        def entry(correct: int, total: int) -> dict[str, Any]:
            return {"accuracy": correct / total if total else None, "correct": correct, "total": total}

        return {
            **entry(self.correct, self.total),
            "by_category": {k: entry(*self.by_category[k]) for k in sorted(self.by_category)},
            "by_l2_category": {k: entry(*self.by_l2[k]) for k in sorted(self.by_l2)},
        }
