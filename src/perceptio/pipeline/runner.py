"""Resumable stages and run folders: what lets a long job be run again and redo only what changed.

A pipeline is a list of :class:`Stage`\\ s run in order by :func:`run_stages`. ``stages.json`` records, per stage,
the digest of its settings chained with every earlier stage's (so a changed world redoes the tokenizer trained on
it), whether it finished and how long it took. A stage is marked ``running`` on disk before it starts: a rerun
reuses a finished stage, resumes an interrupted resumable one under the same digest, and starts every other one
from an empty folder.

Jobs outside a stage list (the parallel training runs of an experiment) keep their settings in a stamp beside
their folder instead (:func:`fresh_folder`). Both go through one rule: work made with the same settings is kept,
anything else in the folder is removed before the work starts, so nothing made with other settings is mixed in.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceptio.utils.run_folder import settings_digest

__all__ = ["Stage", "fresh_folder", "run_stages", "stage_records"]


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    Attributes:
        name: its key in ``stages.json`` and in the printed lines.
        settings: what its output depends on besides the earlier stages (JSON-able; other objects count by
            ``str``); part of the chained digest.
        run: does the work; called with ``True`` when it continues an interrupted run of itself.
        folder: the stage's own output folder, emptied before a fresh run; None when the stage writes nothing of
            its own that could be stale (a file rewritten each time, or a folder it must never remove).
        resumable: an interrupted run with the same digest is continued rather than started again.
    """

    name: str
    settings: Any
    run: Callable[[bool], None]
    folder: Path | None = None
    resumable: bool = False


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

    def start(self, name: str, digest: str) -> None:
        for later in self.order[self.order.index(name) + 1 :]:  # made from the old output of this stage
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
    stages: Sequence[Stage],
    record: Path | str,
    *,
    echo: Callable[[str], None] = print,
    until: str | None = None,
) -> None:
    """Run (or reuse, or resume) ``stages`` in order, up to and including ``until`` (default: all), keeping their
    records in ``record`` (a ``stages.json``).

    Prints ``[k/n] name: running``, ``resuming`` or ``finished earlier, reusing ...``, then ``done in N s``. Records
    of stages that ``stages`` no longer has are dropped."""
    names = tuple(stage.name for stage in stages)
    if until is not None and until not in names:
        raise ValueError(f"until must be one of {names}, got {until!r}")
    records = _Records(Path(record), names, stage_records(record))
    for name in set(records.records) - set(names):  # made by another pipeline in this folder: stale
        records.records.pop(name)
    previous = ""
    for k, stage in enumerate(stages, start=1):
        digest = previous = settings_digest(previous, stage.settings)
        label = f"[{k}/{len(stages)}] {stage.name}"
        saved = records.records.get(stage.name, {})
        if saved.get("digest") == digest and saved.get("status", "done") == "done":
            echo(f"{label}: finished earlier, reusing {stage.folder or 'it'}")
        else:
            interrupted = stage.resumable and saved.get("status") == "running"
            resume = _claim(stage.folder, saved.get("digest") if interrupted else None, digest)
            records.start(stage.name, digest)
            echo(f"{label}: {'resuming' if resume else 'running'}")
            start = time.perf_counter()
            stage.run(resume)
            records.finish(stage.name, digest, time.perf_counter() - start)
            echo(f"{label}: done in {time.perf_counter() - start:.0f} s")
        if stage.name == until:
            break


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
