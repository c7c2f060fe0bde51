"""Parallel jobs as Python calls: each in its own process on one thread with its output in a log, a failure
reported with the end of its log, finished jobs not redone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from perceptio.pipeline import Job, JobsFailedError, run_jobs


def _writes(path: Path, text: str) -> Job:
    return Job(f"write {path.name}", partial(Path.write_text, path, text), path.with_suffix(".log"), path.is_file)


def test_jobs_run_in_their_own_processes_with_their_output_in_the_log(tmp_path: Path) -> None:
    lines: list[str] = []
    jobs = [_writes(tmp_path / f"out{k}.txt", str(k)) for k in range(3)]
    shell = tmp_path / "shell.log"
    jobs.append(Job("shell", partial(os.system, "echo threads=$OMP_NUM_THREADS"), shell, shell.is_file))
    noted = tmp_path / "noted.txt"
    write = partial(Path.write_text, noted, "7")
    jobs.append(
        Job("noted", write, noted.with_suffix(".log"), noted.is_file, outcome=lambda: f"wrote {noted.read_text()}")
    )
    run_jobs(jobs, 2, echo=lines.append)
    assert [(tmp_path / f"out{k}.txt").read_text() for k in range(3)] == ["0", "1", "2"]
    assert "threads=1" in shell.read_text() and "--- shell ---" in shell.read_text()
    assert f"  shell: started (log {shell})" in lines and "  shell: done" in lines
    assert "  noted: done, wrote 7" in lines  # the outcome, read by the parent from what the job left on disk


def test_a_failing_job_is_reported_with_its_log_tail_and_the_others_finish(tmp_path: Path) -> None:
    lines: list[str] = []
    log = tmp_path / "bad.log"
    bad = Job("bad", partial(json.loads, "{not json"), log, lambda: False)
    good = _writes(tmp_path / "good.txt", "ok")
    with pytest.raises(JobsFailedError, match=r"1 job\(s\) failed: bad; their logs name the cause"):
        run_jobs([bad, good], 1, echo=lines.append)
    assert (tmp_path / "good.txt").read_text() == "ok"
    assert f"  bad: FAILED (exit 1); the end of {log}:" in lines
    tail = lines[lines.index(f"  bad: FAILED (exit 1); the end of {log}:") + 1]
    assert "JSONDecodeError" in tail and "Traceback" in log.read_text()


def test_finished_jobs_are_not_redone_and_unfinished_work_counts_as_a_failure(tmp_path: Path) -> None:
    lines: list[str] = []
    done = Job("done", partial(json.loads, "{would fail if run"), tmp_path / "done.log", lambda: True)
    silent = Job("silent", partial(print, "exits 0, writes nothing"), tmp_path / "silent.log", lambda: False)
    with pytest.raises(JobsFailedError, match="silent"):
        run_jobs([done, silent], 2, echo=lines.append)
    assert lines[0] == "  done: finished earlier, reusing" and not (tmp_path / "done.log").exists()
    assert "  silent: FAILED (exit 0); the end of" in lines[2] and "exits 0, writes nothing" in lines[3]


def test_a_job_ends_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    """A parent killed outright cannot stop its jobs; they notice and exit rather than go on writing into folders
    that the parent's next run starts over."""
    late, log = tmp_path / "late.txt", tmp_path / "sleeper.log"
    work = f"import pathlib, time; time.sleep(2.5); pathlib.Path({str(late)!r}).write_text('late')"
    script = (
        "from functools import partial\nfrom pathlib import Path\nfrom perceptio.pipeline import Job, run_jobs\n"
        f"run_jobs([Job('sleeper', partial(exec, {work!r}), Path({str(log)!r}), None)], 1)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (log.is_file() and "--- sleeper ---" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.is_file(), "the job never started"
    parent.kill()
    parent.wait()
    time.sleep(4.0)
    assert not late.exists()


def test_last_line_shows_the_end_of_a_progress_bar_without_its_name(tmp_path: Path) -> None:
    from perceptio.pipeline import last_line

    log = tmp_path / "train.log"
    assert last_line(log) == "starting"
    bar = "train:  35%|███▌      | 518/1500 [01:35<02:51,  5.73it/s, loss=2.391, lr=8.0e-04, samples=94.2]"
    log.write_text("--- header ---\n" + "train:   0%|  | 0/1500\r" + bar + "\n")
    assert last_line(log, drop="train:") == bar[len("train:") :].strip()[-90:]
    assert last_line(log, drop="train:").startswith("35%")  # the name goes before the line is shortened
    assert last_line(log) == bar[-90:] and last_line(log, drop="eval:") == bar[-90:]


def _niceness(path: Path) -> None:
    path.write_text(str(os.nice(0)))


def test_a_job_runs_at_the_niceness_it_asks_for(tmp_path: Path) -> None:
    jobs = [
        Job(name, partial(_niceness, tmp_path / f"{name}.txt"), tmp_path / f"{name}.log", None, nice=nice)
        for name, nice in (("plain", 0), ("background", 5))
    ]
    run_jobs(jobs, 2, echo=lambda _: None)
    mine = os.nice(0)
    assert int((tmp_path / "plain.txt").read_text()) == mine
    assert int((tmp_path / "background.txt").read_text()) == min(mine + 5, 19)


def test_a_negative_niceness_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from perceptio.pipeline import Stage

    with pytest.raises(ValueError, match=r"job 'x': nice must be >= 0 .* got -5"):
        Job("x", partial(_niceness, tmp_path / "x.txt"), tmp_path / "x.log", None, nice=-5)
    with pytest.raises(ValueError, match=r"stage 'baseline': nice must be >= 0 .* got -1"):
        Stage("baseline", (), partial(_niceness, tmp_path / "y.txt"), nice=-1)
