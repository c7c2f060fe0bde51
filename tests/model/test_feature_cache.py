"""The frozen-feature cache: the stored tensors come back for the same input, the budget holds, the oldest go."""

from __future__ import annotations

import pytest
import torch

from perceptio.models.feature_cache import FeatureCache


def test_hits_return_the_stored_tensors_and_the_budget_evicts_the_oldest() -> None:
    calls = []

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.append(x)
        return (x * 2, x.sum(0, keepdim=True))

    inputs = [torch.full((1, 4), float(k)) for k in range(3)]
    entry = 4 * 4 + 4 * 4  # two float32 tensors of 4 values
    cache = FeatureCache(max_bytes=2 * entry)
    first = cache.get(inputs[0], encode)
    assert cache.get(inputs[0].clone(), encode)[0] is first[0]  # equal values hit, whatever the tensor object
    assert (cache.hits, cache.misses, len(calls)) == (1, 1, 1)
    cache.get(inputs[1], encode)
    cache.get(inputs[0], encode)  # 0 is now the most recently used
    cache.get(inputs[2], encode)  # over budget: 1, the least recently used, goes
    assert len(cache) == 2 and cache.bytes == 2 * entry
    cache.get(inputs[1], encode)
    assert len(calls) == 4 and cache.misses == 4
    assert cache.get(torch.zeros(1, 4, dtype=torch.float64), encode)[0].dtype == torch.float64  # dtype in the key


def test_a_zero_budget_keeps_nothing_and_a_negative_one_is_refused() -> None:
    cache = FeatureCache(0)
    cache.get(torch.ones(1, 2), lambda x: (x,))
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(-1)
