"""Resumable stages and run folders: what lets a long job be run again and redo only what changed.

A pipeline is a list of :class:`Stage`\\ s run in order by :func:`run_stages`; stages that do not need each other's
output can form a :class:`Concurrent` group, whose stages run at the same time in processes of their own.
``stages.json`` records, per stage, the digest of its settings chained with every earlier stage's (so a changed
world redoes the tokenizer trained on it), whether it finished and how long it took. A stage is marked ``running``
on disk before it starts: a rerun reuses a finished stage, resumes an interrupted resumable one under the same
digest, and starts every other one from an empty folder.

Jobs outside a stage list (the parallel training runs of an experiment) keep their settings in a stamp beside their
folder instead (:func:`fresh_folder`). Both go through one rule: work made with the same settings is kept, anything
else in the folder is removed before the work starts, so nothing made with other settings is mixed in.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from perceptio.pipeline.jobs import Job, last_line, run_jobs
from perceptio.utils.run_folder import settings_digest

__all__ = ["Concurrent", "Stage", "fresh_folder", "run_stages", "stage_records", "without_resume"]


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    Attributes:
        name: its key in ``stages.json`` and in the printed lines.
        settings: what its output depends on besides the earlier stages (JSON-able; other objects count by
            ``str``); part of the chained digest.
        run: does the work; called as ``run(resume=...)``, True when it continues an interrupted run of itself.
        folder: the stage's own output folder, emptied before a fresh run; None when the stage writes nothing of
            its own that could be stale (a file rewritten each time, or a folder it must never remove).
        resumable: an interrupted run with the same digest is continued rather than started again.
        nice: in a :class:`Concurrent` group, added to the niceness of its process: a stage off the critical
            path (one that ends well before its siblings) yields the CPU to them, with the same results.
    """

    name: str
    settings: Any
    run: Callable[[bool], None]
    folder: Path | None = None
    resumable: bool = False
    nice: int = 0

    def __post_init__(self) -> None:
        if self.nice < 0:
            raise ValueError(
                f"stage {self.name!r}: nice must be >= 0 (a process may lower its priority only), got {self.nice}"
            )


@dataclass(frozen=True)
class Concurrent:
    """Stages that need none of each other's output, run at the same time: each in a process of its own on one
    thread (see :func:`~perceptio.pipeline.jobs.run_jobs`), ``parallel`` at a time (default: one per CPU core), in
    the order given, its output (progress bars included) in ``logs/<name>.log`` beside ``stages.json``.

    Their digests chain in the order given, as if they ran one after another, and each keeps its own record, so a
    group is reused, resumed or redone stage by stage. Each stage's ``run`` goes to its process by pickling: a
    module-level function or a ``functools.partial`` of one, not a lambda. Small stages gain little (a process
    starts in a few seconds); stages that each keep one core busy gain the most.
    """

    stages: tuple[Stage, ...]
    parallel: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ValueError("a Concurrent group needs at least one stage")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {self.parallel}")


def without_resume(function: Callable[..., object], *args: Any, **kwargs: Any) -> Callable[..., None]:
    """The run of a stage that always starts from an empty folder: ``function(*args, **kwargs)``, whatever
    ``resume`` says. A ``partial`` of a module-level function pickles, so it suits a :class:`Concurrent` group."""
    return partial(_call_without_resume, function, *args, **kwargs)


def _call_without_resume(function: Callable[..., object], *args: Any, resume: bool = False, **kwargs: Any) -> None:
    function(*args, **kwargs)


def stage_records(path: Path | str) -> dict[str, dict[str, Any]]:
    """The records of a ``stages.json`` (``{}`` when there is none): per stage ``digest``, ``status``
    (``running`` or ``done``) and, once done, ``seconds``."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class _Records:
    path: Path
    order: tuple[str, ...]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def start(self, name: str, digest: str, keep: Sequence[str] = ()) -> None:
        for later in self.order[self.order.index(name) + 1 :]:  # made from the old output of this stage
            if later not in keep:
                self.records.pop(later, None)
        self.records[name] = {"digest": digest, "status": "running"}
        self._write()

    def finish(self, name: str, digest: str, seconds: float) -> None:
        self.records[name] = {"digest": digest, "status": "done", "seconds": round(seconds, 1)}
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=2) + "\n")
        tmp.replace(self.path)


def _claim(folder: Path | None, recorded: str | None, current: str) -> bool:
    """The run-folder rule: keep ``folder`` when its work was recorded under ``current`` settings (the caller reuses
    or resumes it); otherwise remove it. Returns whether it was kept."""
    if recorded == current:
        return True
    if folder is not None and folder.exists():
        shutil.rmtree(folder)
    return False


def run_stages(
    stages: Sequence[Stage | Concurrent],
    record: Path | str,
    *,
    echo: Callable[[str], None] = print,
    until: str | None = None,
) -> None:
    """Run (or reuse, or resume) ``stages`` in order, up to and including ``until`` (default: all; a stage of a
    :class:`Concurrent` group ends the run after its whole group), keeping their records in ``record`` (a
    ``stages.json``).

    Prints ``[k/n] name: running``, ``resuming`` or ``finished earlier, reusing ...``, then ``done in N s``. Records
    of stages that ``stages`` no longer has are dropped."""
    groups = [item.stages if isinstance(item, Concurrent) else (item,) for item in stages]
    flat = [stage for group in groups for stage in group]
    names = tuple(stage.name for stage in flat)
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    if until is not None and until not in names:
        raise ValueError(f"until must be one of {names}, got {until!r}")
    records = _Records(Path(record), names, stage_records(record))
    for name in set(records.records) - set(names):  # made by another pipeline in this folder: stale
        records.records.pop(name)
    previous, k = "", 0
    for item, group in zip(stages, groups, strict=True):
        plans = []
        for stage in group:
            k += 1
            digest = previous = settings_digest(previous, stage.settings)
            plans.append((stage, digest, f"[{k}/{len(flat)}] {stage.name}"))
        if isinstance(item, Concurrent):
            _run_concurrent(item, plans, records, echo)
        else:
            _run_one(*plans[0], records, echo)
        if until in {stage.name for stage in group}:
            break


def _plan(stage: Stage, digest: str, records: _Records) -> bool | None:
    """None when ``stage`` finished earlier under ``digest`` (reuse it); otherwise whether it resumes, its folder
    claimed (emptied unless it resumes)."""
    saved = records.records.get(stage.name, {})
    if saved.get("digest") == digest and saved.get("status", "done") == "done":
        return None
    interrupted = stage.resumable and saved.get("status") == "running"
    return _claim(stage.folder, saved.get("digest") if interrupted else None, digest)


def _run_one(stage: Stage, digest: str, label: str, records: _Records, echo: Callable[[str], None]) -> None:
    resume = _plan(stage, digest, records)
    if resume is None:
        echo(f"{label}: finished earlier, reusing {stage.folder or 'it'}")
        return
    records.start(stage.name, digest)
    echo(f"{label}: {'resuming' if resume else 'running'}")
    start = time.perf_counter()
    stage.run(resume=resume)
    records.finish(stage.name, digest, time.perf_counter() - start)
    echo(f"{label}: done in {time.perf_counter() - start:.0f} s")


def _run_concurrent(
    group: Concurrent, plans: list[tuple[Stage, str, str]], records: _Records, echo: Callable[[str], None]
) -> None:
    """Run the unfinished stages of ``group`` in processes of their own (see :class:`Concurrent`)."""
    for stage, _, _ in plans:
        try:
            pickle.dumps(stage.run)
        except Exception as error:  # noqa: BLE001 - any reason it cannot be sent to a process
            raise TypeError(
                f"stage {stage.name!r} runs in a process of its own (a Concurrent group), so its run must pickle: "
                f"a module-level function or a functools.partial of one, not a lambda or a closure ({error})"
            ) from error
    todo = []
    for stage, digest, label in plans:
        resume = _plan(stage, digest, records)
        if resume is None:
            echo(f"{label}: finished earlier, reusing {stage.folder or 'it'}")
        else:
            todo.append((stage, digest, label, resume))
    if not todo:
        return
    logs = records.path.parent / "logs"
    group_names = [stage.name for stage, _, _ in plans]
    began: dict[str, float] = {}
    jobs = []
    for stage, digest, label, resume in todo:
        records.start(stage.name, digest, keep=group_names)
        echo(f"{label}: {'resuming' if resume else 'running'}")
        log = logs / f"{stage.name}.log"
        finish = partial(_finish_record, records, stage.name, digest, began)
        jobs.append(
            Job(
                label,
                partial(stage.run, resume=resume),
                log,
                None,
                progress=partial(_progress, log, stage.name),
                outcome=finish,
                nice=stage.nice,
            )
        )

    def note(line: str) -> None:  # a stage's time counts from its process's start, not from the group's
        for stage, _, label, _ in todo:
            if line.startswith(f"  {label}: started"):
                began[stage.name] = time.perf_counter()
        echo(line)

    run_jobs(jobs, group.parallel or os.cpu_count() or 1, echo=note, bars=True)


def _progress(log: Path, name: str) -> str:
    """A group stage's latest progress line, without the stage's name when its progress bar starts with it (the
    line is shown after the stage's label)."""
    return last_line(log, drop=f"{name}:")


def _finish_record(records: _Records, name: str, digest: str, began: dict[str, float]) -> str:
    """Record a stage of a group as done (its process exited cleanly); the note on its ``done`` line."""
    seconds = time.perf_counter() - began[name]
    records.finish(name, digest, seconds)
    return f"in {seconds:.0f} s"


def fresh_folder(folder: Path | str, settings: Any) -> bool:
    """Make ``folder`` hold work done with ``settings``, recorded as JSON beside it in ``<folder>.settings.json``:
    kept when the stamp holds the same settings (the work is finished, or its job resumes it), emptied and
    re-stamped when they changed. Returns whether the folder was kept."""
    folder = Path(folder)
    stamp = folder.with_name(folder.name + ".settings.json")
    text = json.dumps(settings, sort_keys=True, default=str)
    kept = _claim(folder, stamp.read_text() if stamp.is_file() else None, text)
    if not kept:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(text)
    return kept
