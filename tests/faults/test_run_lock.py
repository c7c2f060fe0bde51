"""Two writers into one run folder: the second fails at once naming the holder's pid and host; a lock left by a
dead process is taken over; nested and re-entered locks do not conflict (perceptio.utils.runlock)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from perceptio.utils import runlock
from perceptio.utils.runlock import LOCK_NAME, RunFolderLockedError, read_lock, run_lock

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_synth.yaml"
HOST = socket.gethostname()

# A process that holds the lock on argv[1] until its stdin closes.
_HOLDER = """
import sys
from perceptio.utils.runlock import run_lock
with run_lock(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "training"):
    print("held", flush=True)
    sys.stdin.read()
"""

# A process that tries the lock on argv[1] at the time argv[2] (so that several start together), prints the outcome
# and keeps a won lock for a second.
_RACER = """
import sys, time
from perceptio.utils.runlock import RunFolderLockedError, run_lock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    with run_lock(sys.argv[1]):
        print("won", flush=True)
        time.sleep(1.0)
except RunFolderLockedError as err:
    print("refused", err, flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO / "src")}


class _Holder:
    """A live process holding the lock on ``folder``."""

    def __init__(self, folder: Path, what: str = "training") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(folder), what],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "held"
        self.pid = self.process.pid

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def holder(tmp_path: Path):  # noqa: ANN201 - a factory of holders, all released at the end
    made: list[_Holder] = []

    def make(folder: Path, what: str = "training") -> _Holder:
        made.append(_Holder(folder, what))
        return made[-1]

    yield make
    for h in made:
        h.release()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(folder: Path, **record: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    base = {"pid": _dead_pid(), "host": HOST, "started": "2020-01-01T00:00:00+0000", "command": "old", "what": "x"}
    path.write_text(json.dumps({**base, **record}))
    return path


# ------------------------------------------------------------------------------------------------ the lock itself


def test_the_lock_file_records_the_holder_and_goes_away(tmp_path: Path) -> None:
    fresh, existing = tmp_path / "a" / "run", tmp_path / "existing"
    existing.mkdir()
    with run_lock(fresh, "evaluation") as path:
        assert path == fresh / LOCK_NAME and path.is_file()
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == HOST and record["what"] == "evaluation"
        assert record["started"] and record["command"]
        assert read_lock(fresh) == record
    assert not fresh.exists(), "a folder the lock made and nothing else used is removed again"
    with run_lock(existing):
        (existing / "file.txt").write_text("x")
    assert sorted(p.name for p in existing.iterdir()) == ["file.txt"]
    assert read_lock(existing) is None


def test_a_second_process_is_refused_at_once_naming_pid_and_host(tmp_path: Path, holder) -> None:  # noqa: ANN001
    folder = tmp_path / "run"
    first = holder(folder, "training")
    began = time.perf_counter()
    with pytest.raises(RunFolderLockedError) as caught, run_lock(folder, "training"):
        pytest.fail("entered a held folder")
    assert time.perf_counter() - began < 1.0
    message = str(caught.value)
    assert "\n" not in message
    assert f"pid {first.pid} on host {HOST}" in message and "running training" in message
    assert str(folder / LOCK_NAME) in message, "the error says which file to delete if the holder is gone"
    assert caught.value.holder["pid"] == first.pid and caught.value.folder == folder
    first.release()
    with run_lock(folder):  # free again once the holder ends
        pass


def test_the_lock_of_a_killed_holder_is_taken_over(
    tmp_path: Path,
    holder,  # noqa: ANN001
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "run"
    first = holder(folder)
    first.kill()  # SIGKILL: no clean-up, the lock file stays behind
    assert read_lock(folder)["pid"] == first.pid
    with caplog.at_level(logging.WARNING, logger="perceptio.utils.runlock"), run_lock(folder) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(first.pid) in caplog.text
    assert not (folder / LOCK_NAME).exists()


def test_a_stale_lock_file_with_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _write_lock(folder)
    with run_lock(folder) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_live_pid_without_the_flock_is_a_reused_pid(tmp_path: Path) -> None:
    if runlock.fcntl is None:
        pytest.skip("no flock on this platform")
    folder = tmp_path / "run"
    _write_lock(folder, pid=os.getppid())  # alive, but it does not hold the lock: the kernel would say so
    with run_lock(folder) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _write_lock(folder, host="elsewhere.example", pid=4242)
    with pytest.raises(RunFolderLockedError, match=r"pid 4242 on host elsewhere\.example.*delete"), run_lock(folder):
        pass
    assert read_lock(folder)["host"] == "elsewhere.example", "left as it was"


def test_an_unreadable_lock_file_is_waited_for_then_taken_over_when_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runlock, "_SETTLE_S", 0.2)
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / LOCK_NAME
    path.write_bytes(b"")  # its creator may still be writing it
    with pytest.raises(RunFolderLockedError, match="being written, or unreadable"), run_lock(folder):
        pass
    old = time.time() - 3600
    os.utime(path, (old, old))  # an hour old and still empty: a crash between creating and writing it
    with run_lock(folder):
        assert read_lock(folder)["pid"] == os.getpid()


def test_nested_locks_on_other_folders_and_reentry_do_not_conflict(tmp_path: Path) -> None:
    outer, inner = tmp_path / "quickstart", tmp_path / "quickstart" / "train"
    with run_lock(outer, "quickstart"):
        with run_lock(inner, "training"):
            assert read_lock(outer)["what"] == "quickstart" and read_lock(inner)["what"] == "training"
            with run_lock(inner, "tokenizer training"):  # the same thread re-entering: no deadlock, no error
                assert read_lock(inner)["what"] == "training"
            assert (inner / LOCK_NAME).is_file(), "still held by the outer entry"
        assert not (inner / LOCK_NAME).exists()
        assert (outer / LOCK_NAME).is_file()
    assert not (outer / LOCK_NAME).exists()


def test_another_thread_of_the_same_process_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with run_lock(folder):
                pass
        except RunFolderLockedError as err:
            errors.append(err)

    with run_lock(folder):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=10)
    assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0]) and "another thread" in str(errors[0])


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_processes_one_wins(stale: bool, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    if stale:
        _write_lock(folder)
    start = time.time() + 1.5
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(folder), str(start)], stdout=subprocess.PIPE, text=True, env=_env()
        )
        for _ in range(4)
    ]
    outcomes = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert sum(o == "won" for o in outcomes) == 1, outcomes
    refused = [o for o in outcomes if o.startswith("refused")]
    assert len(refused) == 3 and all("pid" in o for o in refused), outcomes
    assert not (folder / LOCK_NAME).exists()


def test_torchrun_ranks_other_than_zero_do_not_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with run_lock(folder):
        assert not (folder / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------ the entry points


def _entry_points(world: Path, folder: Path) -> dict[str, object]:
    from perceptio.config import load_config
    from perceptio.eval.harness import EvalSettings, run_eval
    from perceptio.quickstart import QuickstartConfig, run_quickstart
    from perceptio.tokenizers.depth import DepthTokenizerConfig
    from perceptio.tokenizers.depth.pipeline import train_from_folder
    from perceptio.tokenizers.depth.train import TokenizerTrainConfig, train_tokenizer
    from perceptio.train.config import TrainConfig
    from perceptio.train.loop import train

    recipe = [f"data.root={world}", "model.depth_tokenizer=null", f"run.out_dir={folder}", "eval.datasets={}"]
    tokenizer = DepthTokenizerConfig.from_preset("tiny")
    maps = np.zeros((2, tokenizer.input_size, tokenizer.input_size), dtype=np.float32)
    return {
        "training": lambda: train(load_config(TrainConfig, TINY, recipe), progress=False),
        "evaluation": lambda: run_eval(EvalSettings("refcoco", folder / "no-model", world, folder), progress=False),
        "tokenizer training": lambda: train_tokenizer(maps, tokenizer, TokenizerTrainConfig(steps=1), folder),
        "tokenizer from a folder": lambda: train_from_folder(world, folder, progress=False),
        "quickstart": lambda: run_quickstart(QuickstartConfig(out=folder, progress=False), echo=lambda _: None),
    }


@pytest.mark.parametrize(
    "entry", ["training", "evaluation", "tokenizer training", "tokenizer from a folder", "quickstart"]
)
def test_every_writer_refuses_a_held_folder_before_writing(
    entry: str,
    world_dir: Path,
    tmp_path: Path,
    holder,  # noqa: ANN001
) -> None:
    folder = tmp_path / "run"
    first = holder(folder, "training")
    call = _entry_points(world_dir, folder)[entry]  # the imports are not what is timed
    began = time.perf_counter()
    with pytest.raises(RunFolderLockedError, match=f"pid {first.pid} on host"):
        call()
    assert time.perf_counter() - began < 5.0
    assert [p.name for p in folder.iterdir()] == [LOCK_NAME], "nothing written"


@pytest.mark.parametrize("command", ["eval", "tokenizer", "quickstart"])
def test_cli_turns_a_held_folder_into_one_line_and_exit_2(
    command: str,
    world_dir: Path,
    tmp_path: Path,
    holder,  # noqa: ANN001
) -> None:
    from perceptio.cli.main import app

    folder = tmp_path / "run"
    first = holder(folder)
    args = {
        "eval": ["eval", "refcoco", "--data", str(world_dir), "--out", str(folder), "--model", str(tmp_path)],
        "tokenizer": ["tokenizer", "train", "--data", str(world_dir), "--out", str(folder), "--steps", "1"],
        "quickstart": ["quickstart", "--out", str(folder), "--recipe", str(TINY)],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.pid} on host {HOST}" in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_two_trainings_into_one_out_dir(world_dir: Path, tmp_path: Path) -> None:
    """The issue's case: a second `perceptio train` into the folder of a running one exits 2 at once, names the
    first one's pid, and writes nothing; after the first is killed its lock is taken over."""
    out = tmp_path / "run"
    overrides = [
        f"data.root={world_dir}",
        "model.depth_tokenizer=null",
        f"run.out_dir={out}",
        "run.threads=1",
        "run.checkpoint_every=0",
        "run.global_batch_size=2",
        "run.micro_batch_size=2",
        "eval.datasets={}",
    ]
    command = [sys.executable, "-m", "perceptio", "train", "--config", str(TINY), *overrides]
    first = subprocess.Popen(
        [*command, "run.steps=100000"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while read_lock(out) is None:
            assert first.poll() is None and time.time() < deadline, "the first training did not start"
            time.sleep(0.05)
        assert read_lock(out)["pid"] == first.pid and "train" in read_lock(out)["command"]
        began = time.perf_counter()
        second = subprocess.run(
            [*command, "optim.lr=0.5", "--overwrite"], env=_env(), capture_output=True, text=True, timeout=120
        )
        seconds = time.perf_counter() - began
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), second.stderr
        assert f"pid {first.pid} on host {HOST}" in lines[0] and "running training" in lines[0]
        assert seconds < 60, f"the second training took {seconds:.0f} s to fail"
        assert first.poll() is None, "the first training goes on"
        if (out / "config.yaml").is_file():  # the first run's recipe, not the second's
            assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] != 0.5
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert read_lock(out)["pid"] == first.pid, "SIGKILL leaves the lock file behind"
    from perceptio.config import load_config
    from perceptio.train.config import TrainConfig
    from perceptio.train.loop import train

    config = load_config(TrainConfig, TINY, [*overrides, "run.steps=1"])
    result = train(config, overwrite=True, progress=False)  # the dead run's lock is taken over
    assert result.model_dir is not None and not (out / LOCK_NAME).exists()


def test_a_forked_child_does_not_keep_a_dead_holders_lock(tmp_path: Path) -> None:
    """A data-loader worker is a fork of the training process; when the training is killed and the worker lives
    on for a moment, the folder is free at once (the child closed its copy of the lock file at the fork)."""
    script = (
        "import os, sys, time\n"
        "from perceptio.utils.runlock import run_lock\n"
        "with run_lock(sys.argv[1], 'training'):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        os.close(1), os.close(2)\n"  # let the caller's pipes close when the holder dies
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    print(child, flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"  # the holder dies without releasing; its forked child lives on
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    child = int(result.stdout.strip())
    try:
        os.kill(child, 0)  # still alive
        with run_lock(tmp_path, "training"):  # the dead holder's lock is taken over at once
            pass
    finally:
        os.kill(child, signal.SIGKILL)
