"""SIGKILL at random moments of evaluation, depth-tokenizer training and training (3 seeds each), then the
command again with ``--resume`` (or, when the kill came before the first checkpoint, afresh): the result equals the
uninterrupted run's, and no finished work is lost. The slow tier (each case runs the command two or three times)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from perceptio.utils.checkpoints import latest_checkpoint

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_synth.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _perceptio(*args: str) -> list[str]:
    return [sys.executable, "-m", "perceptio", *args]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _kill_at_random(command: list[str], started: Callable[[], bool], seed: int, within: float) -> bool:
    """Start ``command``; once ``started()`` holds, SIGKILL it after a delay drawn from [0, within) s. Returns
    whether it was killed (False: it finished first)."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not started():
        if process.poll() is not None:
            return False
        assert time.time() < deadline, "the job never started its work"
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0, within))
    if process.poll() is not None:
        return False
    process.kill()
    process.wait()
    return True


def test_evaluation_killed_at_random_resumes_to_the_same_predictions(world_dir: Path, tmp_path: Path) -> None:
    data = ["eval", "hardblink", "--data", str(world_dir / "hardblink" / "val"), "--batch-size", "2"]
    straight = tmp_path / "straight"
    _run(_perceptio(*data, "--out", str(straight)))
    killed_any = False
    for seed in SEEDS:
        out = tmp_path / f"killed{seed}"
        killed_any |= _kill_at_random(
            _perceptio(*data, "--out", str(out)), lambda out=out: (out / "predictions.jsonl").is_file(), seed, 4.0
        )
        _run(_perceptio(*data, "--out", str(out), "--resume"))
        assert (out / "predictions.jsonl").read_text() == (straight / "predictions.jsonl").read_text(), seed
        metrics = json.loads((out / "metrics.json").read_text())["metrics"]
        assert metrics == json.loads((straight / "metrics.json").read_text())["metrics"], seed
    assert killed_any, "every run finished before its kill: the test did not test a kill"


def test_tokenizer_training_killed_at_random_resumes_exactly(world_dir: Path, tmp_path: Path) -> None:
    args = ["tokenizer", "train", "--data", str(world_dir), "--steps", "60", "--checkpoint-every", "10"]
    straight = tmp_path / "straight"
    _run(_perceptio(*args, "--out", str(straight)))
    expected = load_file(str(straight / "model.safetensors"))
    killed_any = False
    for seed in SEEDS:
        out = tmp_path / f"killed{seed}"
        killed_any |= _kill_at_random(
            _perceptio(*args, "--out", str(out)), lambda out=out: (out / "train_config.json").is_file(), seed, 3.0
        )
        again = ["--resume"] if latest_checkpoint(out) is not None else []
        _run(_perceptio(*args, "--out", str(out), *again))
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got), seed
    assert killed_any, "every run finished before its kill: the test did not test a kill"


def test_training_killed_at_random_resumes_to_the_same_losses_and_weights(world_dir: Path, tmp_path: Path) -> None:
    def command(out: Path) -> list[str]:
        overrides = [f"data.root={world_dir}", "model.depth_tokenizer=null", f"run.out_dir={out}", "run.steps=16",
                     "run.log_every=2", "run.checkpoint_every=3", "run.threads=1", "run.global_batch_size=4",
                     "run.micro_batch_size=2", "eval.datasets={}"]  # fmt: skip
        return _perceptio("train", "--config", str(TINY), *overrides)

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]

    straight = tmp_path / "straight"
    _run(command(straight))
    expected = load_file(str(straight / "model" / "model.safetensors"))
    killed_any = False
    for seed in SEEDS:
        out = tmp_path / f"killed{seed}"
        killed_any |= _kill_at_random(command(out), lambda out=out: (out / "trainable.txt").is_file(), seed, 6.0)
        _run(command(out) + (["--resume"] if latest_checkpoint(out) is not None else ["--overwrite"]))
        assert losses(out) == losses(straight), seed
        got = load_file(str(out / "model" / "model.safetensors"))
        assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got), seed
    assert killed_any, "every run finished before its kill: the test did not test a kill"


def _stage_status(out: Path, stage: str) -> str | None:
    try:
        return json.loads((out / "stages.json").read_text()).get(stage, {}).get("status")
    except (OSError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None


@pytest.mark.parametrize(("seed", "scratch"), [(SEEDS[0], False), (SEEDS[1], True)])
def test_quickstart_killed_inside_each_stage_finishes_with_the_same_results(
    seed: int, scratch: bool, tmp_path: Path
) -> None:
    """A shortened quickstart SIGKILLed inside each of its stages in turn (world, baseline beside training,
    evaluation from the base; world, tokenizer, segmenter beside the baseline, training, evaluation from random
    weights; at a random moment of each), restarted after every kill: the finished run reports the uninterrupted
    run's metrics, and every stage ends done."""
    short = [
        *(["--from-scratch"] if scratch else []),
        "--recipe", str(TINY), "--num-images", "40", "--tokenizer-steps", "20", "--segmenter-steps", "20",
        "--eval-limit", "4", "--gallery", "2", "--baseline-steps", "20", "run.checkpoint_every=2", "run.log_every=1",
        "eval.every=0", "run.global_batch_size=4", "run.micro_batch_size=4", "run.steps=12",
    ]  # fmt: skip

    def summary(out: Path) -> dict[str, object]:
        def flat(value: object, prefix: str = "") -> dict[str, object]:
            if isinstance(value, dict):
                return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
            return {prefix.rstrip("."): value}

        metrics = flat(json.loads((out / "eval" / "summary.json").read_text()))
        return {k: v for k, v in metrics.items() if "second" not in k}

    straight = tmp_path / "straight"
    _run(_perceptio("quickstart", "--out", str(straight), *short))
    out = tmp_path / "killed"
    command = _perceptio("quickstart", "--out", str(out), *short)
    killed = []
    stages = (
        ("world", "tokenizer", "segmenter", "baseline", "train", "eval")
        if scratch
        else ("world", "baseline", "train", "eval")
    )
    for k, stage in enumerate(stages):
        if _kill_at_random(command, lambda stage=stage: _stage_status(out, stage) == "running", seed * 10 + k, 2.0):
            killed.append(stage)
    _run(command)
    got, expected = summary(out), summary(straight)
    assert got.keys() == expected.keys()
    # counts and texts equal; real numbers up to float32 rounding: after a kill inside the evaluation stage the
    # resumed process computes some maps in another order of operations (seen: depth AbsRel 1.9674684434631722 vs
    # ...36973395, and the ~2e-7 soft-merging depth loss of the image-use table in its 7th digit)
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
        else:
            assert got[key] == value, key
    stages = json.loads((out / "stages.json").read_text())
    assert all(stage["status"] == "done" for stage in stages.values()), stages
    assert len(killed) >= 3, f"only {killed} were killed while running: the stages finished too fast to test"
