"""Tokenizer training: kill-and-resume follows the uninterrupted run exactly; the CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from perceptio.cli.main import app
from perceptio.tokenizers.depth import DepthTokenizer, DepthTokenizerConfig
from perceptio.tokenizers.depth.train import TokenizerTrainConfig, latest_checkpoint, train_tokenizer

SMALL = DepthTokenizerConfig(input_size=32, channels=(8, 16), num_res_blocks=1, code_dim=8, num_codes=16)
runner = CliRunner()


def _maps(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 32)[:, None] * np.ones((1, 32))
    return np.clip(ramp[None] + rng.normal(0, 0.1, size=(n, 32, 32)), 0, 1).astype(np.float32)


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    maps = _maps(40)
    config = TokenizerTrainConfig(steps=20, batch_size=4, lr=1e-3, checkpoint_every=10, log_every=5)
    full = train_tokenizer(maps, SMALL, config, tmp_path / "full", progress=False)
    # a run "killed" after step 10: only its checkpoint survives; resume it
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(latest_checkpoint(tmp_path / "full"), killed / "checkpoints" / "step-0000010")
    resumed = train_tokenizer(maps, SMALL, config, killed, resume=True, progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    resumed_log = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert resumed_log == [15, 20]
    summary = json.loads((killed / "training.json").read_text())
    assert summary["resumed_from"] == 10


def test_two_fresh_runs_with_one_seed_are_identical(tmp_path: Path) -> None:
    config = TokenizerTrainConfig(steps=6, batch_size=4, lr=1e-3, checkpoint_every=0, log_every=3)
    a = train_tokenizer(_maps(12), SMALL, config, tmp_path / "a", progress=False)
    b = train_tokenizer(_maps(12), SMALL, config, tmp_path / "b", progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    c = train_tokenizer(
        _maps(12), SMALL, TokenizerTrainConfig(**{**config.__dict__, "seed": 1}), tmp_path / "c", progress=False
    )
    assert not torch.equal(a.quantizer.codebook, c.quantizer.codebook)


def test_resume_between_log_lines_and_refused_changes(tmp_path: Path) -> None:
    maps = _maps(16)
    config = TokenizerTrainConfig(steps=12, batch_size=4, lr=1e-3, checkpoint_every=5, log_every=4)  # not aligned
    train_tokenizer(maps, SMALL, config, tmp_path / "full", progress=False)
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(latest_checkpoint(tmp_path / "full"), killed / "checkpoints" / "step-0000010")
    shutil.copy(tmp_path / "full" / "train_log.jsonl", killed / "train_log.jsonl")  # the log ran past step 10
    train_tokenizer(maps, SMALL, config, killed, resume=True, progress=False)
    assert (killed / "train_log.jsonl").read_text() == (tmp_path / "full" / "train_log.jsonl").read_text()
    changed = TokenizerTrainConfig(**{**config.__dict__, "batch_size": 8})
    with pytest.raises(ValueError, match=r"cannot resume with other settings: train.batch_size \(saved 4, now 8\)"):
        train_tokenizer(maps, SMALL, changed, killed, resume=True, progress=False)
    lower = TokenizerTrainConfig(**{**config.__dict__, "lr": 5e-4})  # the fix after a non-finite loss may resume
    train_tokenizer(maps, SMALL, lower, tmp_path / "full", resume=True, progress=False)
    other = DepthTokenizerConfig(**{**SMALL.to_dict(), "num_codes": 32})
    with pytest.raises(ValueError, match=r"model.num_codes \(saved 16, now 32\)"):
        train_tokenizer(maps, other, config, killed, resume=True, progress=False)
    with pytest.raises(ValueError, match="training maps differ"):
        train_tokenizer(maps[::-1].copy(), SMALL, config, killed, resume=True, progress=False)


def test_invalid_pixels_do_not_count_in_the_loss() -> None:
    tok = DepthTokenizer(SMALL).eval()
    maps = torch.from_numpy(_maps(2))
    valid = torch.ones_like(maps, dtype=torch.bool)
    valid[:, :16] = False
    garbage = maps.clone()
    garbage[:, :16] = torch.rand(2, 16, 32)
    # the same valid pixels give the same loss, whatever the invalid ones hold (encoder input aside)
    out = tok(maps, valid)
    manual = ((tok.decode(out.codes) * 2 - 1 - (maps * 2 - 1)) ** 2)[valid].mean()
    assert out.reconstruction_loss.item() == pytest.approx(manual.item(), rel=1e-4)
    assert tok(garbage, valid).reconstruction_loss.item() != tok(garbage).reconstruction_loss.item()


def test_existing_checkpoints_need_resume_and_resume_needs_checkpoints(tmp_path: Path) -> None:
    config = TokenizerTrainConfig(steps=4, batch_size=2, checkpoint_every=2)
    train_tokenizer(_maps(8), SMALL, config, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_tokenizer(_maps(8), SMALL, config, tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_tokenizer(_maps(8), SMALL, config, tmp_path / "empty", resume=True, progress=False)
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 1  # step 2 (the final step saves the model)


def test_cli_train_then_eval(world_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    args = [
        "tokenizer",
        "train",
        "--data",
        str(world_dir),
        "--out",
        str(out),
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "10",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "saved the tokenizer" in result.output
    assert DepthTokenizer.from_pretrained(out).config.grid == (8, 8)
    assert (out / "mean_map.npy").is_file() and len(list((out / "checkpoints").glob("step-*"))) == 2

    result = runner.invoke(
        app, ["tokenizer", "eval", "--ckpt", str(out), "--data", str(world_dir), "--out", str(tmp_path / "ev")]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (
        metrics["space"] == "metric_depth" and metrics["num_maps"] == 4 and metrics["baseline"] == "mean training map"
    )
    assert set(metrics["tokenizer"]["closest_point_accuracy"]) == {"2", "3", "4", "5"}
    assert 0 < metrics["codebook"]["usage"] <= 1 and metrics["tokenizer"]["rmse"] > 0
    assert "closest of 3 points" in result.output and (tmp_path / "ev" / "reconstructions.png").is_file()


def test_cli_errors_are_clear(world_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["tokenizer", "train", "--data", str(world_dir), "--out", str(tmp_path / "x"), "--preset", "huge"]
    )
    assert result.exit_code == 2 and "unknown depth-tokenizer preset 'huge'" in result.output
    result = runner.invoke(
        app, ["tokenizer", "train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "data folder not found" in result.output
    result = runner.invoke(
        app, ["tokenizer", "eval", "--ckpt", str(tmp_path), "--data", str(world_dir), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 2 and "config.json not found" in result.output
    result = runner.invoke(
        app, ["tokenizer", "train", "--data", str(world_dir), "--out", str(tmp_path / "x"), "--split", "dev"]
    )
    assert result.exit_code == 2 and "no split 'dev'" in result.output
