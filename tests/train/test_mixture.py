"""Dataset mixtures: weights, curriculum, determinism per step, and configuration errors."""

from __future__ import annotations

from collections import Counter

import pytest

from perceptio.config import ConfigError, load_config
from perceptio.data.mixture import MixtureSampler, MixtureSpec


def test_draws_follow_the_weights() -> None:
    sampler = MixtureSampler(
        {"refseg": 100, "depth": 50, "vqa": 10}, MixtureSpec(weights={"refseg": 2, "depth": 1, "vqa": 1})
    )
    counts = Counter(name for step in range(400) for name, _ in sampler.batch(step, 20))
    total = sum(counts.values())
    assert abs(counts["refseg"] / total - 0.5) < 0.02 and abs(counts["vqa"] / total - 0.25) < 0.02
    assert all(0 <= index < 10 for step in range(50) for name, index in sampler.batch(step, 8) if name == "vqa")


def test_curriculum_interpolates_and_holds() -> None:
    spec = MixtureSpec(weights={"depth": 1.0, "reasoning": 1.0}, curriculum={"depth": [(0, 9.0), (100, 1.0)]})
    assert spec.weights_at(0) == pytest.approx({"depth": 0.9, "reasoning": 0.1})
    assert spec.weights_at(50) == pytest.approx({"depth": 5 / 6, "reasoning": 1 / 6})
    assert spec.weights_at(1000) == pytest.approx({"depth": 0.5, "reasoning": 0.5})
    sampler = MixtureSampler({"depth": 5, "reasoning": 5}, spec)
    early = Counter(n for s in range(0, 10) for n, _ in sampler.batch(s, 50))
    late = Counter(n for s in range(500, 510) for n, _ in sampler.batch(s, 50))
    assert early["depth"] > 0.8 * 500 and abs(late["depth"] - 250) < 50


def test_batches_depend_only_on_seed_and_step() -> None:
    spec = MixtureSpec(weights={"a": 1, "b": 3})
    a = MixtureSampler({"a": 7, "b": 9}, spec, seed=3)
    b = MixtureSampler({"a": 7, "b": 9}, spec, seed=3)
    assert [a.batch(s, 4) for s in (5, 6, 7)] == [b.batch(s, 4) for s in (5, 6, 7)]  # resuming at step 5
    assert a.batch(5, 4) != MixtureSampler({"a": 7, "b": 9}, spec, seed=4).batch(5, 4)


def test_bad_mixtures_are_explained() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        MixtureSpec(weights={"a": -1})
    with pytest.raises(ValueError, match=r"curriculum names \['c'\]"):
        MixtureSpec(weights={"a": 1}, curriculum={"c": [(0, 1.0)]})
    with pytest.raises(ValueError, match="strictly increasing"):
        MixtureSpec(weights={"a": 1}, curriculum={"a": [(10, 1.0), (5, 2.0)]})
    with pytest.raises(ValueError, match="every mixture weight is 0"):
        MixtureSpec(weights={"a": 0}).weights_at(0)
    with pytest.raises(ValueError, match=r"not loaded: \['b'\]"):
        MixtureSampler({"a": 3}, MixtureSpec(weights={"a": 1, "b": 1}))
    with pytest.raises(ValueError, match=r"datasets \['a'\] are empty"):
        MixtureSampler({"a": 0}, MixtureSpec(weights={"a": 1}))


def test_a_mixture_loads_from_a_recipe_section(tmp_path) -> None:  # noqa: ANN001
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("weights: {refseg: 3, depth: 1}\ncurriculum:\n  depth: [[0, 5], [200, 1]]\n")
    spec = load_config(MixtureSpec, recipe)
    assert spec.curriculum == {"depth": [(0, 5.0), (200, 1.0)]}
    recipe.write_text("weights: {refseg: 3}\ncuriculum: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'curriculum'"):
        load_config(MixtureSpec, recipe)
