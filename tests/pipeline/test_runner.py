"""The stage runner: ``stages.json`` digests chained through the earlier stages (as the quickstart always wrote
them), reuse of finished stages, a changed stage and every later one redone from an empty folder, an interrupted
resumable stage continued, ``until``; and the settings stamp beside a folder."""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import pytest

from perceptio.pipeline import Concurrent, Stage, fresh_folder, run_stages, stage_records


class Recorder:
    """Stages that note each call, write a file into their folder, and fail on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, bool]] = []
        self.fail: set[str] = set()

    def stages(self, settings: dict[str, object], resumable: tuple[str, ...] = ()) -> list[Stage]:
        return [
            Stage(name, value, self._runner(name), folder=self.root / name, resumable=name in resumable)
            for name, value in settings.items()
        ]

    def _runner(self, name: str):  # noqa: ANN202 - the stage's callable
        def run(resume: bool) -> None:
            self.calls.append((name, resume))
            (self.root / name).mkdir(parents=True, exist_ok=True)
            (self.root / name / f"made-{len(self.calls)}").write_text("")
            if name in self.fail:
                raise RuntimeError(f"{name} interrupted")

        return run


def _old_digest(*parts: object) -> str:
    """The quickstart's digest before the pipeline package: existing ``stages.json`` files hold these."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


SETTINGS = {"world": (40, 0, Path("x")), "tokenizer": (5,), "train": ({"steps": 4},)}


def test_digests_chain_through_earlier_stages_as_the_quickstart_wrote_them(tmp_path: Path) -> None:
    stages, lines = Recorder(tmp_path), []
    run_stages(stages.stages(SETTINGS), tmp_path / "stages.json", echo=lines.append)
    records = stage_records(tmp_path / "stages.json")
    previous = ""
    for name, value in SETTINGS.items():
        previous = _old_digest(previous, value)
        assert records[name]["digest"] == previous and records[name]["status"] == "done"
        assert isinstance(records[name]["seconds"], float)
    assert lines[0] == "[1/3] world: running" and lines[1].startswith("[1/3] world: done in ")
    assert stage_records(tmp_path / "missing.json") == {}


def test_a_changed_stage_redoes_it_and_every_later_one_from_an_empty_folder(tmp_path: Path) -> None:
    stages = Recorder(tmp_path)
    run_stages(stages.stages(SETTINGS), tmp_path / "stages.json", echo=lambda _: None)
    lines: list[str] = []
    run_stages(stages.stages(SETTINGS), tmp_path / "stages.json", echo=lines.append)
    assert lines == [f"[{k}/3] {n}: finished earlier, reusing {tmp_path / n}" for k, n in enumerate(SETTINGS, 1)]
    assert len(stages.calls) == 3

    changed = {**SETTINGS, "tokenizer": (6,)}
    run_stages(stages.stages(changed), tmp_path / "stages.json", echo=lines.append)
    assert stages.calls[3:] == [("tokenizer", False), ("train", False)]
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == ["made-4"]  # the old output is gone
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == ["made-1"]


def test_an_interrupted_stage_resumes_only_when_resumable_and_unchanged(tmp_path: Path) -> None:
    stages = Recorder(tmp_path)
    stages.fail = {"tokenizer"}
    with pytest.raises(RuntimeError, match="tokenizer interrupted"):
        run_stages(stages.stages(SETTINGS, resumable=("tokenizer",)), tmp_path / "stages.json", echo=lambda _: None)
    records = stage_records(tmp_path / "stages.json")
    assert records["tokenizer"]["status"] == "running" and "train" not in records

    stages.fail = set()
    lines: list[str] = []
    run_stages(stages.stages(SETTINGS, resumable=("tokenizer",)), tmp_path / "stages.json", echo=lines.append)
    assert "[2/3] tokenizer: resuming" in lines and ("tokenizer", True) in stages.calls
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == ["made-2", "made-3"]  # kept

    # not resumable: an interrupted run starts again from an empty folder
    stages.fail = {"train"}
    with pytest.raises(RuntimeError):
        run_stages(stages.stages({**SETTINGS, "train": (7,)}), tmp_path / "stages.json", echo=lambda _: None)
    stages.fail = set()
    run_stages(stages.stages({**SETTINGS, "train": (7,)}), tmp_path / "stages.json", echo=lines.append)
    assert stages.calls[-1] == ("train", False) and len(list((tmp_path / "train").iterdir())) == 1

    # resumable, but its settings changed meanwhile: started again
    stages.fail = {"tokenizer"}
    with pytest.raises(RuntimeError):
        interrupted = {**SETTINGS, "tokenizer": (9,)}
        run_stages(stages.stages(interrupted, resumable=("tokenizer",)), tmp_path / "stages.json", echo=lambda _: None)
    stages.fail = set()
    changed = {**SETTINGS, "tokenizer": (8,)}
    run_stages(stages.stages(changed, resumable=("tokenizer",)), tmp_path / "stages.json", echo=lines.append)
    assert stages.calls[-2] == ("tokenizer", False) and len(list((tmp_path / "tokenizer").iterdir())) == 1


def test_a_stage_left_out_drops_its_record_and_redoes_the_later_ones(tmp_path: Path) -> None:
    stages = Recorder(tmp_path)
    run_stages(stages.stages(SETTINGS), tmp_path / "stages.json", echo=lambda _: None)
    fewer = {name: value for name, value in SETTINGS.items() if name != "tokenizer"}
    run_stages(stages.stages(fewer), tmp_path / "stages.json", echo=lambda _: None)
    assert [name for name, _ in stages.calls] == ["world", "tokenizer", "train", "train"]  # its chain changed
    assert set(stage_records(tmp_path / "stages.json")) == {"world", "train"}


def test_until_stops_after_the_named_stage(tmp_path: Path) -> None:
    stages = Recorder(tmp_path)
    run_stages(stages.stages(SETTINGS), tmp_path / "stages.json", echo=lambda _: None, until="tokenizer")
    assert [name for name, _ in stages.calls] == ["world", "tokenizer"]
    assert set(stage_records(tmp_path / "stages.json")) == {"world", "tokenizer"}
    with pytest.raises(ValueError, match="until must be one of"):
        run_stages(stages.stages(SETTINGS), tmp_path / "stages.json", until="report")


def test_fresh_folder_keeps_work_of_the_same_settings_and_empties_it_otherwise(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "arm"
    settings = {"overrides": ["run.steps=3"], "recipe": Path("configs/x.yaml")}
    assert fresh_folder(folder, settings) is False
    stamp = tmp_path / "runs" / "arm.settings.json"
    assert stamp.read_text() == json.dumps(settings, sort_keys=True, default=str)  # as the experiment wrote it
    folder.mkdir()
    (folder / "checkpoint").write_text("")
    assert fresh_folder(folder, dict(settings)) is True and (folder / "checkpoint").is_file()
    assert fresh_folder(folder, {**settings, "overrides": ["run.steps=4"]}) is False and not folder.exists()
    assert json.loads(stamp.read_text())["overrides"] == ["run.steps=4"]


STAGE_MODULE = '''
import json, os, time
from pathlib import Path


def run(root, name, *, resume, seconds=0.0):
    """A stage in a process of its own: notes its call, process and times; fails while a flag file exists."""
    start = time.time()
    time.sleep(seconds)
    (Path(root) / name).mkdir(parents=True, exist_ok=True)
    (Path(root) / name / f"made-{time.time_ns()}").write_text("")
    with open(Path(root) / "calls.jsonl", "a") as calls:
        note = {"name": name, "resume": resume, "pid": os.getpid(), "start": start, "end": time.time()}
        calls.write(json.dumps(note) + "\\n")
    if (Path(root) / f"fail-{name}").exists():
        raise RuntimeError(f"{name} interrupted")
'''


@pytest.fixture
def stage_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - the module
    """A module of stage functions that the processes of a Concurrent group can import (tests are not importable
    by name under pytest's importlib mode)."""
    import importlib

    folder = tmp_path / "module"
    folder.mkdir()
    (folder / "concurrent_stages.py").write_text(STAGE_MODULE)
    monkeypatch.syspath_prepend(str(folder))  # spawned processes start with the parent's sys.path
    return importlib.import_module("concurrent_stages")


def _group_pipeline(root: Path, module, settings: dict[str, object], resumable=()) -> list:  # noqa: ANN001
    def stage(name: str, seconds: float = 0.0) -> Stage:
        run = partial(module.run, str(root), name, seconds=seconds)
        return Stage(name, settings[name], run, folder=root / name, resumable=name in resumable)

    group = Concurrent((stage("a", 1.5), stage("b", 1.5), stage("c")), parallel=2)
    return [stage("world"), group, stage("train")]


def _calls(root: Path) -> list[dict]:
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


GROUP = {"world": (1,), "a": (2,), "b": (3,), "c": (4,), "train": (5,)}


def test_a_concurrent_group_runs_its_stages_side_by_side_in_processes_of_their_own(
    tmp_path: Path, stage_module
) -> None:  # noqa: ANN001
    root, lines = tmp_path / "run", []
    root.mkdir()
    run_stages(_group_pipeline(root, stage_module, GROUP), root / "stages.json", echo=lines.append)
    calls = {call["name"]: call for call in _calls(root)}
    assert set(calls) == set(GROUP)
    assert calls["world"]["pid"] == os.getpid() == calls["train"]["pid"]  # plain stages run here
    assert len({calls[name]["pid"] for name in "abc"} | {os.getpid()}) == 4  # each of the group in its own
    assert calls["a"]["start"] < calls["b"]["end"] and calls["b"]["start"] < calls["a"]["end"]  # at the same time
    assert calls["c"]["start"] >= min(calls["a"]["end"], calls["b"]["end"])  # two at a time
    assert calls["train"]["start"] >= max(call["end"] for call in calls.values() if call["name"] != "train")
    records, previous = stage_records(root / "stages.json"), ""
    for name, value in GROUP.items():  # the digests chain as if the group ran one stage after another
        previous = _old_digest(previous, value)
        assert records[name]["digest"] == previous and records[name]["status"] == "done", name
    assert records["a"]["seconds"] >= 1.5 and "[2/5] a: running" in lines and "[5/5] train: running" in lines
    assert any(line.startswith("  [2/5] a: done, in ") for line in lines)
    assert (root / "logs" / "a.log").is_file()


def test_a_group_resumes_its_interrupted_stage_and_reuses_its_finished_ones(tmp_path: Path, stage_module) -> None:  # noqa: ANN001
    from perceptio.pipeline import JobsFailedError

    root = tmp_path / "run"
    root.mkdir()
    (root / "fail-b").write_text("")
    pipeline = _group_pipeline(root, stage_module, GROUP, resumable=("b",))
    with pytest.raises(JobsFailedError, match="b"):
        run_stages(pipeline, root / "stages.json", echo=lambda _: None)
    records = stage_records(root / "stages.json")
    assert records["a"]["status"] == records["c"]["status"] == "done" and records["b"]["status"] == "running"
    assert "train" not in records and "b interrupted" in (root / "logs" / "b.log").read_text()

    (root / "fail-b").unlink()
    lines: list[str] = []
    run_stages(pipeline, root / "stages.json", echo=lines.append)
    later = [(call["name"], call["resume"]) for call in _calls(root)][4:]
    assert later == [("b", True), ("train", False)]  # a and c reused, b continued
    assert f"[2/5] a: finished earlier, reusing {root / 'a'}" in lines and "[3/5] b: resuming" in lines
    assert all(record["status"] == "done" for record in stage_records(root / "stages.json").values())


def test_a_group_stage_that_cannot_go_to_a_process_is_refused_before_anything_runs(tmp_path: Path) -> None:
    stages = Recorder(tmp_path)
    world, tokenizer, train = stages.stages(SETTINGS)
    with pytest.raises(TypeError, match="stage 'tokenizer' runs in a process of its own .* not a lambda"):
        run_stages([world, Concurrent((tokenizer,)), train], tmp_path / "stages.json", echo=lambda _: None)
    assert stages.calls == [("world", False)]


def test_a_malformed_group_or_pipeline_is_refused_with_what_is_wrong(tmp_path: Path) -> None:
    stages = Recorder(tmp_path)
    world, tokenizer, train = stages.stages(SETTINGS)
    with pytest.raises(ValueError, match="needs at least one stage"):
        Concurrent(())
    with pytest.raises(ValueError, match="parallel must be at least 1, got 0"):
        Concurrent((tokenizer,), parallel=0)
    with pytest.raises(ValueError, match="stage names must be unique"):
        run_stages([world, tokenizer, Concurrent((tokenizer,))], tmp_path / "stages.json", echo=lambda _: None)
    assert stages.calls == []
