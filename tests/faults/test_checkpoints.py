"""Checkpoints a resume can trust: an exploding update never becomes "the last good checkpoint", a damaged newest
checkpoint is passed over for the previous intact one, and a log line cut short by a kill does not stop a resume."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from perceptio.config import load_config
from perceptio.tokenizers.depth import DepthTokenizerConfig
from perceptio.tokenizers.depth.train import TokenizerTrainConfig, train_tokenizer
from perceptio.train.config import TrainConfig
from perceptio.train.loop import NonFiniteLossError, train
from perceptio.utils.checkpoints import checkpoint_problem, last_good_checkpoint, latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_synth.yaml"
SMALL = DepthTokenizerConfig(input_size=32, channels=(8, 16), num_res_blocks=1, code_dim=8, num_codes=16)


def _checkpoint(out: Path, step: int) -> Path:
    folder = out / "checkpoints" / f"step-{step:07d}"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(64)}, str(folder / "trainable.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def test_damaged_newest_checkpoints_are_passed_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _checkpoint(tmp_path, 2)
    truncated = _checkpoint(tmp_path, 4)
    weights = truncated / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])  # the end of the file lost
    empty_state = _checkpoint(tmp_path, 6)
    (empty_state / "trainer_state.json").write_text("")
    unfinished = _checkpoint(tmp_path, 8)
    (unfinished / "trainer_state.json").unlink()  # killed before the checkpoint was complete
    assert checkpoint_problem(good) is None
    assert "trainable.safetensors" in checkpoint_problem(truncated)
    assert "trainer_state.json is empty or not whole JSON" in checkpoint_problem(empty_state)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == good
    passed_over = " ".join(r.getMessage() for r in caplog.records)
    assert "step-0000004" in passed_over and "step-0000006" in passed_over and "step-0000008" not in passed_over


def test_last_good_checkpoint_sets_aside_the_weights_that_failed(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    assert last_good_checkpoint(tmp_path, 4) == tmp_path / "checkpoints" / "step-0000002"
    aside = tmp_path / "checkpoints" / "bad-step-0000004"
    assert "non-finite loss at step 4" in (aside / "REASON.txt").read_text()
    assert (aside / "trainable.safetensors").is_file()  # kept for inspection
    assert last_good_checkpoint(tmp_path, 1) is None


def _overrides(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={world}",
        "model.depth_tokenizer=null",
        f"run.out_dir={out}",
        "run.log_every=1",
        "run.threads=1",
        "run.global_batch_size=4",
        "run.micro_batch_size=4",
        "eval.datasets={}",
        *extra,
    ]


def test_an_exploding_update_is_not_the_checkpoint_to_resume_from(world_dir: Path, tmp_path: Path) -> None:
    """lr 1e6: the first update is finite but huge (weights ~5e5), and the next loss is not finite. The checkpoint
    written between them must not be offered as the last good state; restarting as the error says then trains."""
    exploding = load_config(
        TrainConfig,
        TINY,
        _overrides(
            world_dir, tmp_path, "run.steps=6", "run.checkpoint_every=1", "optim.lr=1e6", "optim.warmup_ratio=0"
        ),  # fmt: skip
    )
    with pytest.raises(NonFiniteLossError) as caught:
        train(exploding, progress=False)
    message = str(caught.value)
    assert "non-finite loss at step 1 " in message  # the forward after the exploding update of step 0
    assert latest_checkpoint(tmp_path) is None  # step-0000001 holds the exploded weights: set aside, not offered
    assert (tmp_path / "checkpoints" / "bad-step-0000001" / "REASON.txt").is_file()
    assert "No good checkpoint" in message and "--overwrite" in message
    sane = load_config(TrainConfig, TINY, _overrides(world_dir, tmp_path, "run.steps=3", "run.checkpoint_every=1"))
    result = train(sane, overwrite=True, progress=False)  # the recovery the error suggests
    assert np.isfinite(result.last_log["loss"]) and result.steps == 3


def test_resume_past_a_set_aside_checkpoint(world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN at a step that has just been checkpointed: that checkpoint is set aside, --resume continues from the one
    before and finishes."""
    from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration

    forward = PerceptioForConditionalGeneration.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # the forward of step 4, which starts from checkpoint step-0000004
            out.loss = out.loss * float("nan")
        return out

    config = load_config(TrainConfig, TINY, _overrides(world_dir, tmp_path, "run.steps=6", "run.checkpoint_every=2"))
    monkeypatch.setattr(PerceptioForConditionalGeneration, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*step-0000002.*--resume"):
        train(config, progress=False)
    assert (tmp_path / "checkpoints" / "bad-step-0000004" / "REASON.txt").is_file()
    monkeypatch.setattr(PerceptioForConditionalGeneration, "forward", forward)
    result = train(config, resume=True, progress=False)
    assert result.resumed_from == 2 and result.steps == 6


def _maps(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 32)[:, None] * np.ones((1, 32))
    return np.clip(ramp[None] + rng.normal(0, 0.1, size=(n, 32, 32)), 0, 1).astype(np.float32)


def test_tokenizer_resume_survives_a_cut_off_log_line_and_a_damaged_checkpoint(tmp_path: Path) -> None:
    maps = _maps(16)
    config = TokenizerTrainConfig(steps=12, batch_size=4, lr=1e-3, checkpoint_every=4, log_every=4, keep_checkpoints=3)
    train_tokenizer(maps, SMALL, config, tmp_path / "full", progress=False)
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    for step in (4, 8):
        shutil.copytree(
            tmp_path / "full" / "checkpoints" / f"step-{step:07d}", killed / "checkpoints" / f"step-{step:07d}"
        )
    (killed / "checkpoints" / "step-0000008" / "trainer_state.json").write_text("")  # damaged: falls back to 4
    full_log = (tmp_path / "full" / "train_log.jsonl").read_text()
    (killed / "train_log.jsonl").write_text(full_log[: full_log.index("\n") + 1] + full_log.splitlines()[1][:20])
    train_tokenizer(maps, SMALL, config, killed, resume=True, progress=False)
    assert (killed / "train_log.jsonl").read_text() == full_log
    assert json.loads((killed / "training.json").read_text())["resumed_from"] == 4


def test_tokenizer_refuses_an_infinite_learning_rate() -> None:
    with pytest.raises(ValueError, match="lr must be finite"):
        TokenizerTrainConfig(lr=float("inf"))


def test_log_records_are_identical_after_a_resume_between_log_lines(world_dir: Path, tmp_path: Path) -> None:
    """log_every 3, checkpoint_every 4: the resume from step 4 must log step 6 over steps 4-6 as the straight run
    did, not over steps 5-6 only."""
    extra = ("run.steps=9", "run.checkpoint_every=4", "run.keep_checkpoints=3", "run.log_every=3")
    straight = tmp_path / "straight"
    train(load_config(TrainConfig, TINY, _overrides(world_dir, straight, *extra)), progress=False)
    killed = tmp_path / "killed"  # as if killed after step 7: the log ran past the newest checkpoint (step 4)
    shutil.copytree(straight, killed)
    for later in ("model", "training.json", "checkpoints/step-0000008"):
        path = killed / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(load_config(TrainConfig, TINY, _overrides(world_dir, killed, *extra)), resume=True, progress=False)

    def records(out: Path) -> list[dict]:
        timing = ("seconds", "samples_per_s")
        lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k not in timing} for line in lines]

    assert [r["step"] for r in records(killed)] == [3, 6, 9]
    assert records(killed) == records(straight)


def test_a_checkpoint_of_another_layout_is_refused_by_name(tmp_path: Path) -> None:
    """A depth-tokenizer checkpoint of the old layout (model.safetensors, optimizer_groups.json) names what is
    missing instead of failing on a file it cannot find."""
    from perceptio.utils.checkpoints import load_checkpoint

    folder = _checkpoint(tmp_path, 2)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"step-0000002 has no aliases.json, optimizer.safetensors, optimizer.json"):
        load_checkpoint(folder, model, torch.optim.Adam(model.parameters()))
