"""Weights are written with the user's umask (the safetensors library alone writes 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from perceptio.models.build import build_preset, save_model
from perceptio.tokenizers.depth import DepthTokenizer, DepthTokenizerConfig
from perceptio.utils.checkpoints import save_checkpoint


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> int:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(folder: Path) -> set[int]:
    files = list(folder.rglob("*.safetensors"))
    assert files
    return {stat.S_IMODE(f.stat().st_mode) for f in files}


def test_every_weights_file_follows_the_umask(umask: int, tmp_path: Path) -> None:
    expected = 0o666 & ~umask
    model, processor = build_preset("tiny", seed=0)
    save_model(model, processor, tmp_path / "model")
    DepthTokenizer(DepthTokenizerConfig(input_size=32, channels=(8, 16), num_res_blocks=1)).save_pretrained(
        tmp_path / "tokenizer"
    )
    weights = {"w": torch.ones(3)}
    save_checkpoint(tmp_path / "run", 1, weights, {"state": {"w": {"exp_avg": torch.zeros(3)}}, "param_groups": []},
                    {}, keep=1)  # fmt: skip
    for folder in ("model", "tokenizer", "run"):
        assert _modes(tmp_path / folder) == {expected}, folder
