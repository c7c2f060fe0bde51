"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perceptio.tokenizers.depth import DepthStats, DepthTokenizer, DepthTokenizerConfig
from perceptio.tokenizers.depth.evaluate import PointRule, closest_point_sets, depth_metrics, evaluate_tokenizer
from perceptio.tokenizers.depth.teachers import TeacherMap


def test_depth_metrics_by_hand() -> None:
    target = np.array([1.0, 2.0, 4.0, 8.0])
    prediction = np.array([1.0, 2.5, 3.0, 8.0])
    m = depth_metrics(prediction, target)
    assert m["abs_rel"] == pytest.approx((0 + 0.25 + 0.25 + 0) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 1 + 0) / 4))
    # ratios 1, 1.25 (not < 1.25), 1.333, 1 -> 2 of 4 within
    assert m["delta1"] == pytest.approx(0.5)


def test_a_failed_zero_prediction_counts_as_wrong_and_invalid_pixels_are_left_out() -> None:
    target = np.array([0.5, 0.6, 0.9, 1.0])
    zero = depth_metrics(np.array([0.0, 0.0, 0.9, 1.0]), target)
    assert zero["delta1"] == pytest.approx(0.5) and zero["abs_rel"] > 0.49
    valid = np.array([False, False, True, True])
    assert depth_metrics(np.array([0.0, 0.0, 0.9, 1.0]), target, valid) == {"abs_rel": 0.0, "rmse": 0.0, "delta1": 1.0}
    assert math.isnan(depth_metrics(target, target, np.zeros(4, dtype=bool))["abs_rel"])


def test_closest_point_sets_follow_the_rule_and_the_valid_mask() -> None:
    rng = np.random.default_rng(0)
    inverse = rng.uniform(0.1, 1.0, size=(40, 40))
    valid = np.ones((40, 40), dtype=bool)
    valid[:, :20] = False
    rule = PointRule()
    sets = closest_point_sets(inverse, 3, rule, rng, valid)
    assert len(sets) == rule.sets_per_image
    for points in sets:
        rows, cols = points[:, 0], points[:, 1]
        assert (cols >= 20).all() and (rows >= rule.band[0] * 40 - 1).all() and (rows <= rule.band[1] * 40 + 1).all()
        values = np.sort(inverse[rows, cols])[::-1]
        assert values[0] >= values[1] * (1 + rule.closest_gap)
        assert np.all(values[:-1] >= values[1:] * (1 + rule.min_gap))
    assert closest_point_sets(np.full((40, 40), 0.5), 2, rule, rng) == []  # no depth differences, no sets


def test_usage_perplexity_and_relative_teachers() -> None:
    config = DepthTokenizerConfig(input_size=16, channels=(8, 16), num_res_blocks=0, code_dim=4, num_codes=4)
    tok = DepthTokenizer(config).eval()
    with torch.no_grad():  # a codebook the encoder's outputs cannot all reach: count what is used
        tok.quantizer.codebook.copy_(torch.eye(4) * 100)
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32)[:, None], (1, 16))
    maps = [TeacherMap(ramp, np.ones((16, 16), bool), DepthStats(0.1, 1.0), metric=True)]
    results = evaluate_tokenizer(tok, maps)
    codes = tok.encode(torch.from_numpy(ramp)[None]).reshape(-1).numpy()
    counts = np.bincount(codes, minlength=4) / codes.size
    expected = math.exp(-sum(p * math.log(p) for p in counts if p > 0))
    assert results["codebook"]["usage"] == pytest.approx((counts > 0).mean())
    assert results["codebook"]["perplexity"] == pytest.approx(expected)
    relative = [TeacherMap(ramp, np.ones((16, 16), bool), DepthStats(0.0, 1.0), metric=False)]
    rel = evaluate_tokenizer(tok, relative)
    assert rel["space"] == "relative_inverse_depth" and rel["tokenizer"]["abs_rel"] is None
    assert rel["tokenizer"]["rmse_normalized"] >= 0
    with pytest.raises(ValueError, match="mix metric and relative"):
        evaluate_tokenizer(tok, maps + relative)
