"""Evaluation tasks are modules in a registry; the runner has no per-task code, so a new benchmark is one class."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from perceptio.eval import tasks
from perceptio.eval.harness import EvalSettings, run_eval
from perceptio.eval.tasks.base import REGISTRY, EvalTask, UnknownTaskError, get_task, register
from perceptio.weights import shipped


def test_every_task_is_registered_and_an_unknown_name_lists_them() -> None:
    assert set(tasks.TASKS) == {"refcoco", "hardblink", "blink", "mmbench", "depth", "vqa"}
    with pytest.raises(UnknownTaskError, match="choose one of .*refcoco"):
        get_task("cityscapes")
    with pytest.raises(UnknownTaskError):
        EvalSettings(task="cityscapes", model=Path("m"), data=Path("d"), out=Path("o"))


def test_the_runner_has_no_per_task_branches() -> None:
    source = (Path(tasks.__file__).parents[1] / "harness.py").read_text()
    assert re.findall(r"task\s*(?:==|!=|in)\s", source) == []


def test_a_new_benchmark_is_one_registered_class(world_dir: Path, tmp_path: Path) -> None:
    """A benchmark written outside the package: counts how many answers are non-empty."""

    @register
    class AnswerLength(EvalTask):
        name = "answer_length_test"

        def load(self, settings):  # noqa: ANN001, ANN202
            return get_task("vqa").load(settings)

        def score(self, sample, prediction, context, model):  # noqa: ANN001, ANN202
            return {"chars": len(prediction.answer)}

        def summarize(self, scores, samples):  # noqa: ANN001, ANN202
            return {"answered": sum(s["chars"] > 0 for s in scores)}

    try:
        settings = EvalSettings(
            task="answer_length_test",
            model=shipped("tiny-perceptio"),
            data=world_dir / "vqa" / "val.json",
            out=tmp_path / "out",
            image_root=world_dir / "images",
            limit=3,
            device="cpu",
        )
        metrics = run_eval(settings, progress=False)
    finally:
        REGISTRY.pop("answer_length_test")
    assert metrics["task"] == "answer_length_test" and metrics["count"] == 3 and 0 <= metrics["answered"] <= 3
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [set(line["score"]) for line in lines] == [{"chars"}] * 3


def test_first_mask_is_refused_for_a_task_that_scores_no_masks(tmp_path: Path) -> None:
    EvalSettings(task="refcoco", model=tmp_path, data=tmp_path, out=tmp_path, first_mask=True)
    with pytest.raises(ValueError, match="first_mask is for the refcoco task .* not 'vqa'"):
        EvalSettings(task="vqa", model=tmp_path, data=tmp_path, out=tmp_path, first_mask=True)
