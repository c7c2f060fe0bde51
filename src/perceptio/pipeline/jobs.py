"""Several Python jobs at once, each in its own process on one thread, with its output in a log file.

An experiment's training runs and evaluations are independent and each fits one core, so they run side by side,
as many at a time as there are cores. Every job gets a fresh ``spawn``ed process rather than a seat in a
``ProcessPoolExecutor``: a job killed from outside (out of memory) then fails alone instead of breaking the pool
under the others, and an error or Ctrl-C here can stop the jobs still running.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from perceptio.errors import UserError

__all__ = ["Job", "JobsFailedError", "last_line", "run_jobs"]

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
"""The environment of each job's process (set before it starts, so that libraries read it when the job's modules
load): one thread per job, no progress bars in the logs."""


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` while the block runs (a spawned process copies it when it starts)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class Job:
    """One unit of work for :func:`run_jobs`.

    Attributes:
        name: shown in the progress lines.
        call: the work; it is sent to a new process, so it must pickle (a module-level function, or a
            ``functools.partial`` of one with picklable arguments). Its return value is not used.
        log: the file its output (stdout and stderr, a traceback included) is appended to.
        done: whether its work is finished (checked before, to skip it, and after, to confirm it); None: the work
            is not done before it runs, and is done when its process exits cleanly.
        progress: a short note of how far it is, shown every ``report_every`` seconds while it runs.
        outcome: a short note of what it found, shown on the line that says it is done (the job leaves its
            results on disk, so the parent reads them there).
        nice: added to its process's CPU niceness (``os.nice``): a job that can wait runs on what the others
            leave free, and its results do not change.
    """

    name: str
    call: Callable[[], object]
    log: Path
    done: Callable[[], bool] | None
    progress: Callable[[], str] = lambda: ""
    outcome: Callable[[], str] = lambda: ""
    nice: int = 0

    def __post_init__(self) -> None:
        if self.nice < 0:
            raise ValueError(
                f"job {self.name!r}: nice must be >= 0 (a process may lower its priority only), got {self.nice}"
            )


class JobsFailedError(UserError, RuntimeError):
    """Some jobs failed; each failure was reported with the end of its log."""


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Watch (in a daemon thread) that the process that started this one is alive; exit at once when it is gone.
    A parent killed outright (SIGKILL, out of memory) cannot stop its jobs, and a job left running would go on
    writing into folders that the parent's next run starts over."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _work(call: Callable[[], object], log: Path, name: str, parent: int, nice: int = 0) -> None:
    """The body of a job's process: one thread, stdout and stderr into ``log`` (a traceback lands there too), at
    ``nice`` more niceness; it ends with its parent."""
    _exit_with_parent(parent)
    if nice:
        os.nice(nice)
    if "torch" in sys.modules:  # imported while unpickling ``call``: set its threads too, whatever it read
        import torch

        torch.set_num_threads(1)
    handle = log.open("a")
    handle.write(f"\n--- {name} ---\n")
    handle.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    call()


def _tail(path: Path, lines: int = 15) -> list[str]:
    """The last non-empty lines of a log (progress-bar carriage returns split into lines)."""
    text = path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""
    return [line for line in text.splitlines() if line.strip()][-lines:]


def last_line(log: Path, *, drop: str = "") -> str:
    """The last line of a job's log, shortened to its last 90 characters: with ``run_jobs(..., bars=True)``, its
    progress bar's latest state (a ``Job.progress``). ``drop``: a prefix left out first when the line starts with
    it (e.g. the bar's name, when the line is shown after it)."""
    lines = _tail(log, 1)
    if not lines:
        return "starting"
    line = lines[-1].strip()
    return (line[len(drop) :].lstrip() if drop and line.startswith(drop) else line)[-90:]


def run_jobs(
    jobs: Sequence[Job],
    parallel: int,
    *,
    echo: Callable[[str], None] = print,
    report_every: float = 30.0,
    bars: bool = False,
) -> None:
    """Run the unfinished ``jobs``, ``parallel`` at a time, each in a new process on one thread.

    Prints when each job is reused, starts, finishes (with its ``outcome``) or fails (a failure with the end of
    its log), and every ``report_every`` seconds the ``progress`` of those running. Logs are appended to, so an
    interrupted job's log is kept. A failed job does not stop the others. ``bars`` leaves the jobs' progress bars
    on (into their logs), e.g. for a ``progress`` that shows a log's last line.

    Raises:
        JobsFailedError: after all jobs ended, when any failed (exited with an error, or did not finish its work).
    """
    finished = {id(job) for job in jobs if job.done is not None and job.done()}
    for job in jobs:
        if id(job) in finished:
            echo(f"  {job.name}: finished earlier, reusing")
    pending = [job for job in jobs if id(job) not in finished]
    spawn = multiprocessing.get_context("spawn")
    running: list[tuple[Job, BaseProcess]] = []
    failed: list[str] = []
    last_report = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                echo(f"  {job.name}: started (log {job.log})")
                work = (job.call, job.log, job.name, os.getpid(), job.nice)
                process = spawn.Process(target=_work, args=work, name=job.name)
                with _environment({k: v for k, v in ONE_THREAD.items() if not (bars and k == "TQDM_DISABLE")}):
                    process.start()
                running.append((job, process))
            wait([process.sentinel for _, process in running], timeout=2.0)
            for item in list(running):
                job, process = item
                if process.exitcode is None:
                    continue
                process.join()
                running.remove(item)
                if process.exitcode != 0 or (job.done is not None and not job.done()):
                    failed.append(job.name)
                    echo(f"  {job.name}: FAILED (exit {process.exitcode}); the end of {job.log}:")
                    echo("    " + "\n    ".join(_tail(job.log)))
                else:
                    note = job.outcome()
                    echo(f"  {job.name}: done" + (f", {note}" if note else ""))
            if running and time.monotonic() - last_report > report_every:
                last_report = time.monotonic()
                echo("  " + "; ".join(f"{job.name} {job.progress()}" for job, _ in running))
    finally:
        for _, process in running:  # only on an exception here (Ctrl-C): stop what is still running
            process.terminate()
            process.join()
    if failed:
        raise JobsFailedError(f"{len(failed)} job(s) failed: {', '.join(failed)}; their logs name the cause")
