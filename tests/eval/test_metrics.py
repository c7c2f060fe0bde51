"""cIoU / gIoU, relative-depth accuracy and MMBench scoring against hand-computed values and an independent
re-implementation of LISA's histogram formula."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from perceptio.data.schema import Sample, Task
from perceptio.eval import MMBenchRecord, RelativeDepthMeter, SegmentationMeter, score_mmbench


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """A bool mask with the (row0, row1, col0, col1) boxes set."""
    out = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        out[r0:r1, c0:c1] = True
    return out


# ------------------------------------------------------------------------------------------ segmentation


def test_hand_computed_ciou_and_giou_with_the_empty_rules() -> None:
    meter = SegmentationMeter()
    shape = (4, 5)
    gt = _mask(shape, (0, 2, 0, 2))  # 4 pixels
    # 1. overlap: prediction 2x3 covers the GT: I = 4, U = 6
    s1 = meter.add([_mask(shape, (0, 2, 0, 3))], gt)
    # 2. empty prediction, non-empty GT (3 pixels): IoU 0, U = 3 enters the denominator
    s2 = meter.add([], _mask(shape, (3, 4, 0, 3)))
    # 3. empty prediction, empty GT (no-target): IoU 1, nothing added to cIoU
    s3 = meter.add(None, np.zeros(shape, dtype=bool))
    # 4. non-empty prediction (2 pixels), empty GT: IoU 0, U = 2 enters the denominator
    s4 = meter.add([_mask(shape, (3, 4, 3, 5))], np.zeros(shape, dtype=bool))

    assert [(s.intersection, s.union) for s in (s1, s2, s3, s4)] == [(4, 6), (0, 3), (0, 0), (0, 2)]
    assert s1.iou == 4 / (6 + 1e-5) and s2.iou == 0.0 and s3.iou == 1.0 and s4.iou == 0.0
    result = meter.result()
    assert result["ciou"] == 4 / (11 + 1e-10)
    assert result["giou"] == pytest.approx((4 / (6 + 1e-5) + 0 + 1 + 0) / 4, rel=1e-12)
    assert (result["count"], result["intersection"], result["union"]) == (4, 4, 11)
    assert (result["empty_targets"], result["empty_predictions"]) == (2, 2)


def test_perfect_match_scores_one_minus_epsilon() -> None:
    meter = SegmentationMeter()
    gt = _mask((10, 10), (2, 7, 2, 6))  # 20 pixels
    assert meter.add([gt.copy()], gt).iou == pytest.approx(1 - 1e-5 / 20, rel=1e-9)
    assert meter.result()["giou"] < 1.0
    assert meter.result()["ciou"] == pytest.approx(1.0, abs=1e-9)


def test_several_masks_are_ored_or_first_kept() -> None:
    shape = (6, 6)
    gt = _mask(shape, (0, 2, 0, 6))  # 12 pixels
    left, right = _mask(shape, (0, 2, 0, 3)), _mask(shape, (0, 2, 3, 6))
    union = SegmentationMeter().add([left, right], gt)
    assert (union.intersection, union.union) == (12, 12)
    first = SegmentationMeter(combine="first").add([left, right], gt)
    assert (first.intersection, first.union) == (6, 12)
    stacked = SegmentationMeter().add(np.stack([left, right]), gt)
    assert stacked == union


def test_all_empty_predictions() -> None:
    rng = np.random.default_rng(0)
    meter = SegmentationMeter()
    gts = [rng.random((8, 8)) < 0.3 for _ in range(6)] + [np.zeros((8, 8), dtype=bool)] * 2
    for gt in gts:
        meter.add([], gt)
    result = meter.result()
    assert result["ciou"] == 0.0
    assert result["giou"] == pytest.approx(2 / 8)  # the share of empty GTs


def test_ignore_pixels_count_in_neither_mask() -> None:
    shape = (4, 4)
    gt = _mask(shape, (0, 2, 0, 2))
    pred = _mask(shape, (0, 2, 0, 4))
    ignore = _mask(shape, (0, 2, 2, 4))  # the part of the prediction outside the GT
    score = SegmentationMeter().add([pred], gt, ignore=ignore)
    assert (score.intersection, score.union) == (4, 4)


def test_bad_masks_raise_with_the_fix() -> None:
    meter = SegmentationMeter()
    gt = np.zeros((4, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"shape \(5, 4\) but the ground truth is \(4, 5\).*resize"):
        meter.add([np.zeros((5, 4), dtype=bool)], gt)
    with pytest.raises(ValueError, match=r"dtype float32, expected bool; threshold mask logits at 0"):
        meter.add([np.zeros((4, 5), dtype=np.float32)], gt)
    with pytest.raises(ValueError, match="expected a 2-D"):
        meter.add([], np.zeros((1, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="combine must be"):
        SegmentationMeter(combine="max")  # type: ignore[arg-type]
    assert meter.count == 0 and meter.result()["ciou"] is None and meter.result()["giou"] is None


def _lisa_reference(samples: list[tuple[list[np.ndarray], np.ndarray, np.ndarray | None]]) -> tuple[float, float]:
    """LISA's validate(): intersectionAndUnionGPU with K=2 and ignore_index=255, written again in numpy."""
    inters, unions, accs = [], [], []
    for preds, gt, ignore in samples:
        output = np.zeros(gt.shape, dtype=np.int64)
        for pred in preds:  # Sa2VA: OR of the predicted masks; none -> all zero
            output = np.maximum(output, pred.astype(np.int64))
        target = gt.astype(np.int64)
        if ignore is not None:
            target[ignore] = 255
        output = output.reshape(-1)
        target = target.reshape(-1)
        output[target == 255] = 255
        intersection = output[output == target]
        area_i = np.histogram(intersection, bins=2, range=(0, 1))[0].astype(np.float64)
        area_o = np.histogram(output, bins=2, range=(0, 1))[0].astype(np.float64)
        area_t = np.histogram(target, bins=2, range=(0, 1))[0].astype(np.float64)
        area_u = area_o + area_t - area_i
        acc = area_i / (area_u + 1e-5)
        acc[area_u == 0] += 1.0
        inters.append(area_i[1])
        unions.append(area_u[1])
        accs.append(acc[1])
    return sum(inters) / (sum(unions) + 1e-10), float(np.mean(accs))


def _random_samples(seed: int, n: int = 40) -> list[tuple[list[np.ndarray], np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        shape = (int(rng.integers(1, 24)), int(rng.integers(1, 24)))
        gt = rng.random(shape) < rng.choice([0.0, 0.05, 0.4, 0.9])
        preds = [rng.random(shape) < rng.choice([0.0, 0.1, 0.5]) for _ in range(int(rng.integers(0, 4)))]
        ignore = rng.random(shape) < 0.1 if rng.random() < 0.3 else None
        samples.append((preds, gt, ignore))
    return samples


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_agrees_with_lisa_histogram_formula_on_random_masks(seed: int) -> None:
    samples = _random_samples(seed)
    meter = SegmentationMeter()
    for preds, gt, ignore in samples:
        meter.add(preds, gt, ignore=ignore)
    ciou, giou = _lisa_reference(samples)
    result = meter.result()
    assert result["ciou"] == pytest.approx(ciou, rel=1e-12)
    assert result["giou"] == pytest.approx(giou, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 7])
def test_merged_partial_states_equal_one_pass(seed: int) -> None:
    samples = _random_samples(seed, n=30)
    single = SegmentationMeter()
    ranks = [SegmentationMeter(), SegmentationMeter()]
    for k, (preds, gt, ignore) in enumerate(samples):
        single.add(preds, gt, ignore=ignore)
        ranks[k % 2].add(preds, gt, ignore=ignore)  # interleaved, as a distributed sampler shards
    states = [json.loads(json.dumps(rank.state())) for rank in ranks]  # as written to and read from disk
    merged = SegmentationMeter.from_state(states[0]).merge(states[1])
    one, both = single.result(), merged.result()
    for key in ("count", "intersection", "union", "empty_targets", "empty_predictions"):
        assert both[key] == one[key]
    assert both["ciou"] == one["ciou"]  # integer sums: exactly equal
    assert both["giou"] == pytest.approx(one["giou"], rel=1e-12)
    # the merged cIoU is a ratio of sums, not the mean of the ranks' cIoUs
    partial = [rank.result()["ciou"] for rank in ranks]
    assert both["ciou"] != pytest.approx(np.mean(partial), rel=1e-9)


def test_merge_refuses_other_settings_and_bad_states() -> None:
    with pytest.raises(ValueError, match="same settings"):
        SegmentationMeter().merge(SegmentationMeter(combine="first"))
    with pytest.raises(ValueError, match=r"lacks \['count'"):
        SegmentationMeter.from_state({"combine": "union", "iou_sum": 0.0})


# ---------------------------------------------------------------------------------------- relative depth


def _fill(meter: RelativeDepthMeter, point_count: int, correct: int, wrong: int, unparsed: int = 0) -> None:
    for _ in range(correct):
        meter.add(point_count, True)
    for _ in range(wrong - unparsed):
        meter.add(point_count, False)
    for _ in range(unparsed):
        meter.add(point_count, False, parsed=False)


def test_relative_depth_accuracy_per_point_count_and_means() -> None:
    meter = RelativeDepthMeter()
    _fill(meter, 2, correct=3, wrong=1)  # BLINK: 0.75
    _fill(meter, 3, correct=1, wrong=1, unparsed=1)  # 0.5
    _fill(meter, 4, correct=1, wrong=3)  # 0.25
    _fill(meter, 5, correct=0, wrong=2)  # 0.0
    result = meter.result()
    assert result["by_point_count"]["3"] == {"accuracy": 0.5, "correct": 1, "total": 2, "unparsed": 1}
    assert result["mean"] == pytest.approx((0.75 + 0.5 + 0.25 + 0.0) / 4)  # AURORA's 4-column average
    assert result["mean_over"] == [2, 3, 4, 5]
    assert result["hardblink_mean"] == pytest.approx(0.25)
    assert meter.mean([2, 3]) == pytest.approx(0.625)
    with pytest.raises(ValueError, match=r"no questions with \[6\] points"):
        meter.mean([6])


def test_relative_depth_without_all_hardblink_subsets() -> None:
    meter = RelativeDepthMeter()
    _fill(meter, 2, correct=1, wrong=1)
    assert meter.result()["hardblink_mean"] is None and meter.result()["mean"] == 0.5
    assert RelativeDepthMeter().result()["mean"] is None


def test_relative_depth_merge_equals_one_pass() -> None:
    rng = np.random.default_rng(3)
    events = [(int(rng.integers(2, 6)), bool(rng.random() < 0.6)) for _ in range(200)]
    single, a, b = RelativeDepthMeter(), RelativeDepthMeter(), RelativeDepthMeter()
    for k, (n, ok) in enumerate(events):
        single.add(n, ok)
        (a if k < 77 else b).add(n, ok)
    merged = RelativeDepthMeter.from_state(json.loads(json.dumps(a.state()))).merge(b.state())
    assert merged.result() == single.result()
    assert merged.state() == single.state()


def test_relative_depth_bad_input() -> None:
    with pytest.raises(ValueError, match="point_count must be an integer >= 2"):
        RelativeDepthMeter().add(1, True)
    with pytest.raises(ValueError, match="cannot be correct"):
        RelativeDepthMeter().add(3, True, parsed=False)


# ------------------------------------------------------------------------------------------------ MMBench

M = 1_000_000


def _group(g: int, answers: str, predictions: str, category: str, l2: str, skip: tuple[int, ...] = ()) -> list:
    """Records of one circular group: pass k has gold answers[k] and prediction predictions[k] ('-' = None)."""
    return [
        MMBenchRecord(g + k * M, answers[k], None if predictions[k] == "-" else predictions[k], category, l2)
        for k in range(len(answers))
        if k not in skip
    ]


def _dataset() -> tuple[list[MMBenchRecord], list[int]]:
    records = (
        _group(7, "ADCB", "ADCB", "ocr", "perception")  # all copies right
        + _group(8, "BADC", "BAAC", "ocr", "perception")  # pass 2 wrong: circular fails, vanilla right
        + _group(9, "AB", "-B", "logic", "reasoning")  # 2 options; pass 0 unparsed
        + _group(10, "CBAD", "CBAD", "attribute", "perception", skip=(3,))  # last copy missing
        + _group(12, "ACB", "ACB", "logic", "reasoning", skip=(0,))  # main row missing
    )
    expected = [g + k * M for g, n in ((7, 4), (8, 4), (9, 2), (10, 4), (12, 3)) for k in range(n)]
    return records, expected


def test_circular_and_vanilla_with_missing_copies(caplog: pytest.LogCaptureFixture) -> None:
    records, expected = _dataset()
    with caplog.at_level(logging.WARNING, logger="perceptio.eval.metrics"):
        result = score_mmbench(records, expected_indices=expected)
    assert "2 MMBench question(s) lack circular copies" in caplog.text
    assert result["num_questions"] == 5 and result["num_records"] == len(records) == 15
    assert result["incomplete_groups"] == [10, 12]
    assert result["missing_indices"] == [12, 10 + 3 * M]

    circular, vanilla = result["circular"], result["vanilla"]
    assert (circular["correct"], circular["total"], circular["accuracy"]) == (1, 5, 0.2)  # only group 7
    assert (vanilla["correct"], vanilla["total"], vanilla["accuracy"]) == (3, 5, 0.6)  # 7, 8, 10
    assert circular["by_category"] == {
        "attribute": {"accuracy": 0.0, "correct": 0, "total": 1},
        "logic": {"accuracy": 0.0, "correct": 0, "total": 2},
        "ocr": {"accuracy": 0.5, "correct": 1, "total": 2},
    }
    assert vanilla["by_category"]["ocr"] == {"accuracy": 1.0, "correct": 2, "total": 2}
    assert vanilla["by_category"]["attribute"]["accuracy"] == 1.0
    assert vanilla["by_l2_category"] == {
        "perception": {"accuracy": 1.0, "correct": 3, "total": 3},
        "reasoning": {"accuracy": 0.0, "correct": 0, "total": 2},
    }


def test_without_expected_indices_only_visible_gaps_are_found() -> None:
    records, _ = _dataset()
    result = score_mmbench(records)
    # group 12 lacks its pass 0, visibly; group 10's missing last copy cannot be seen without the dataset
    assert result["incomplete_groups"] == [12]
    assert result["missing_indices"] == [12]
    assert result["circular"]["correct"] == 2  # 7 and 10
    assert score_mmbench(_group(5, "AB", "AB", "x", "y", skip=(1,)) + _group(6, "ABC", "ABC", "x", "y", skip=(1,)))[
        "incomplete_groups"
    ] == [6]


def test_vanilla_only_files_score_circular_as_vanilla() -> None:
    records = [MMBenchRecord(i, "A", p, "c", "l2") for i, p in ((1, "A"), (2, "B"), (3, "A"))]
    result = score_mmbench(records, expected_indices=[1, 2, 3])
    assert result["circular"]["accuracy"] == result["vanilla"]["accuracy"] == pytest.approx(2 / 3)
    assert result["incomplete_groups"] == []


def test_records_from_samples_and_string_indices() -> None:
    def sample(index: int, answer: str | None) -> Sample:
        meta = {"index": index, "g_index": index % M, "category": "ocr", "l2_category": "perception"}
        return Sample(sample_id=str(index), task=Task.MULTIPLE_CHOICE, source="mmbench", answer=answer, meta=meta)

    records = [MMBenchRecord.from_sample(sample(3 + k * M, "ABC"[k]), "ABC"[k]) for k in range(3)]
    assert [(r.g_index, r.circular_pass) for r in records] == [(3, 0), (3, 1), (3, 2)]
    result = score_mmbench(records, expected_indices=["3", str(3 + M), 3 + 2 * M])
    assert result["circular"]["accuracy"] == 1.0 and result["circular"]["by_category"]["ocr"]["total"] == 1
    assert MMBenchRecord("1000007", "A", "A").index == 1_000_007
    with pytest.raises(ValueError, match="test files hide the answers"):
        MMBenchRecord.from_sample(sample(4, None), "A")
    with pytest.raises(ValueError, match="test files hide the answers"):
        MMBenchRecord(4, "", "A")


def test_mmbench_bad_input() -> None:
    with pytest.raises(ValueError, match="two records for MMBench index 7"):
        score_mmbench([MMBenchRecord(7, "A", "A"), MMBenchRecord(7, "A", "B")])
    with pytest.raises(ValueError, match=r"indices \[8\] that the dataset does not hold"):
        score_mmbench([MMBenchRecord(8, "A", "A")], expected_indices=[7])
    with pytest.raises(ValueError, match="non-negative integer"):
        MMBenchRecord(-1, "A", "A")
    empty = score_mmbench([])
    assert empty["circular"]["accuracy"] is None and empty["num_questions"] == 0
