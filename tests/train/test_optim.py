"""Optimiser groups, the warm-up + cosine schedule, and global-batch arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from perceptio.train.optim import accumulation_steps, build_optimizer, warmup_cosine


def test_weight_decay_only_on_matrices_and_only_trainable_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0  # bias, norm weight, norm bias
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


def test_the_fused_kernel_updates_as_the_multi_tensor_one_does_to_rounding() -> None:
    weights = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), fused=fused)
        assert all(group["fused"] is (True if fused else None) for group in optimizer.param_groups)
        for step in range(50):
            model.zero_grad()
            model(torch.randn(32, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            optimizer.step()
        weights[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(weights[False], torch.zeros_like(weights[False]))
    torch.testing.assert_close(weights[True], weights[False], rtol=0, atol=1e-5)


def test_warmup_then_cosine() -> None:
    values = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(16)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0) and values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        warmup_cosine(0, warmup_steps=10, total_steps=10)


def test_accumulation_from_a_global_batch() -> None:
    assert accumulation_steps(64, 8, 2) == 4 and accumulation_steps(8, 8) == 1
    with pytest.raises(ValueError, match="not a multiple of micro batch 8 x 2 process"):
        accumulation_steps(20, 8, 2)
