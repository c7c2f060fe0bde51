"""The stage runner: ``stages.json`` digests chained through the earlier stages (as the quickstart always wrote
them), reuse of finished stages, a changed stage and every later one redone from an empty folder, an interrupted
resumable stage continued, ``until``; and the settings stamp beside a folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from perceptio.pipeline import Stage, fresh_folder, run_stages, stage_records


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
