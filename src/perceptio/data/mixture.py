"""Mixtures of datasets with sampling weights and an optional curriculum.

A curriculum gives a dataset's weight as a function of the training step: breakpoints ``(step, weight)``,
linear in between, held constant before the first and after the last (AURORA moves from mostly depth
generation to mostly reasoning this way). Weights are normalised over the datasets at each step.

:class:`MixtureSampler` draws every batch from a generator seeded with ``(seed, step)`` alone, so a run resumed
at step k draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["MixtureSampler", "MixtureSpec"]


@dataclass(frozen=True)
class MixtureSpec:
    """Which datasets to mix and how much of each.

    Attributes:
        weights: dataset name -> sampling weight (relative; need not sum to 1).
        curriculum: dataset name -> ``[[step, weight], ...]`` breakpoints that replace its fixed weight.
    """

    weights: dict[str, float] = field(default_factory=dict)
    curriculum: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("a mixture needs at least one dataset in weights")
        negative = {k: v for k, v in self.weights.items() if v < 0}
        if negative:
            raise ValueError(f"mixture weights must be non-negative, got {negative}")
        unknown = sorted(set(self.curriculum) - set(self.weights))
        if unknown:
            raise ValueError(f"curriculum names {unknown} are not in weights ({sorted(self.weights)})")
        for name, points in self.curriculum.items():
            steps = [int(s) for s, _ in points]
            if not points or steps != sorted(steps) or len(set(steps)) != len(steps):
                raise ValueError(f"curriculum.{name}: breakpoints need strictly increasing steps, got {points}")
            if any(w < 0 for _, w in points):
                raise ValueError(f"curriculum.{name}: weights must be non-negative, got {points}")

    def weights_at(self, step: int) -> dict[str, float]:
        """Normalised weights at ``step`` (they sum to 1)."""
        raw = {}
        for name, weight in self.weights.items():
            points = self.curriculum.get(name)
            if points:
                steps = [float(s) for s, _ in points]
                values = [float(w) for _, w in points]
                weight = float(np.interp(step, steps, values))
            raw[name] = weight
        total = sum(raw.values())
        if total <= 0:
            raise ValueError(f"every mixture weight is 0 at step {step}; check weights and curriculum")
        return {name: w / total for name, w in raw.items()}


class MixtureSampler:
    """Draws (dataset name, index) pairs following a :class:`MixtureSpec`.

    Args:
        sizes: dataset name -> number of samples; every weighted dataset must be present and non-empty.
        spec: weights and curriculum.
        seed: with the step, the only source of randomness.
    """

    def __init__(self, sizes: Mapping[str, int], spec: MixtureSpec, *, seed: int = 0) -> None:
        missing = sorted(set(spec.weights) - set(sizes))
        if missing:
            raise ValueError(f"the mixture names datasets that were not loaded: {missing}; loaded: {sorted(sizes)}")
        empty = sorted(name for name in spec.weights if sizes[name] <= 0)
        if empty:
            raise ValueError(f"datasets {empty} are empty; remove them from the mixture or fix their paths")
        self.sizes = dict(sizes)
        self.spec = spec
        self.seed = seed
        self.names = sorted(spec.weights)

    def batch(self, step: int, batch_size: int) -> list[tuple[str, int]]:
        """The ``batch_size`` (name, index) pairs of training step ``step``."""
        rng = np.random.default_rng([self.seed, step])
        weights = self.spec.weights_at(step)
        probabilities = np.array([weights[name] for name in self.names])
        picks = rng.choice(len(self.names), size=batch_size, p=probabilities)
        return [(self.names[k], int(rng.integers(self.sizes[self.names[k]]))) for k in picks]
