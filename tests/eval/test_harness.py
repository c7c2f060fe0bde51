"""The evaluation harness and `perceptio predict` on a tiny saved model: every task runs, resume after a partial
predictions.jsonl, 2-rank evaluation equals 1-rank, and predict writes every file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from perceptio.cli.main import app
from perceptio.eval.harness import EvalSettings, run_eval, summarize
from perceptio.models import build_preset, save_model

HARDBLINK = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "hardblink"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, processor = build_preset("tiny", seed=0)
    return save_model(model, processor, tmp_path_factory.mktemp("model") / "tiny")


def _settings(task: str, model_dir: Path, data: Path, out: Path, **kw: object) -> EvalSettings:
    return EvalSettings(task=task, model=model_dir, data=data, out=out, batch_size=4, device="cpu", **kw)


@pytest.mark.parametrize(
    ("task", "data", "extra"),
    [
        ("refcoco", ".", {"split": "val", "limit": 6}),
        ("hardblink", "hardblink/val", {}),
        ("mmbench", "mmbench/val.tsv", {"limit": 8}),
        ("depth", ".", {"split": "val", "limit": 3}),
        ("vqa", "vqa/val.json", {"limit": 5}),
    ],
)
def test_every_task_runs_and_writes_its_files(
    task: str, data: str, extra: dict, model_dir: Path, world_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(task, model_dir, world_dir / data, tmp_path, image_root=world_dir / "images", **extra)
    metrics = run_eval(settings, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert lines and metrics["count"] == len(lines)
    assert all({"id", "prompt", "output", "answer", "issues", "score"} <= set(line) for line in lines)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["metrics"] == json.loads(json.dumps(metrics)) and record["protocol"]["spatial_cot"] is True
    assert (tmp_path / "environment.json").is_file()
    if task == "refcoco":
        inter = sum(line["score"]["intersection"] for line in lines)
        union = sum(line["score"]["union"] for line in lines)
        assert metrics["ciou"] == pytest.approx(inter / union if union else 0.0, abs=1e-6)
    if task == "hardblink":
        assert set(metrics["answer"]["by_point_count"]) and 0 <= metrics["answer"]["mean"] <= 1
    if task == "mmbench":
        assert (tmp_path / "vlmevalkit.tsv").read_text().splitlines()[0].endswith("prediction")
        assert "circular" in metrics and "vanilla" in metrics
    if task == "vqa":
        assert 0 <= metrics["accuracy"] <= 1 and all("correct" in line["score"] for line in lines)
    if task == "depth":
        assert metrics["decoded_rate"] == 1.0 and metrics["abs_rel"] >= 0  # the depth task requires a span


def test_no_spatial_cot_bans_spatial_tokens(model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    settings = _settings("hardblink", model_dir, world_dir / "hardblink" / "val", tmp_path, spatial_cot=False)
    run_eval(settings, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(line["score"]["programmatic"] is None for line in lines)
    assert json.loads((tmp_path / "metrics.json").read_text())["protocol"]["spatial_cot"] is False


def test_resume_after_a_partial_predictions_file(model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    full, partial = tmp_path / "full", tmp_path / "partial"
    args = {"split": "val", "limit": 8, "image_root": world_dir / "images"}
    expected = run_eval(_settings("refcoco", model_dir, world_dir, full, **args), progress=False)
    lines = (full / "predictions.jsonl").read_text().splitlines()
    partial.mkdir()
    # three finished lines and one cut short by a kill
    (partial / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    resumed = run_eval(_settings("refcoco", model_dir, world_dir, partial, resume=True, **args), progress=False)
    assert resumed == expected
    assert (partial / "predictions.jsonl").read_text().splitlines() == lines


def test_shards_in_processes_of_their_own_then_a_resumed_run_equal_one_run(
    model_dir: Path, world_dir: Path, tmp_path: Path
) -> None:
    """The quickstart's way of using both cores: blocks of samples predicted by separate shard runs (here one
    after another), then a resumed run that merges and scores them, gives one run's predictions and metrics."""
    args = {"split": "val", "limit": 10, "image_root": world_dir / "images"}
    expected = run_eval(_settings("refcoco", model_dir, world_dir, tmp_path / "one", **args), progress=False)
    out = tmp_path / "sharded"
    settings = _settings("refcoco", model_dir, world_dir, out, resume=True, **args)
    for k in range(3):
        assert run_eval(settings, progress=False, shard=(k, 3)) == {}  # predicted, not scored
    assert len(list(out.glob("predictions.rank*.jsonl"))) == 3 and not (out / "predictions.jsonl").exists()
    assert run_eval(settings, progress=False) == expected
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    assert not list(out.glob("predictions.rank*.jsonl"))
    with pytest.raises(ValueError, match="needs settings.resume"):
        run_eval(replace(settings, resume=False), shard=(0, 2))
    with pytest.raises(ValueError, match="0 <= k < n"):
        run_eval(settings, shard=(2, 2))


def test_resume_refuses_other_settings(model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    data = world_dir / "hardblink" / "val"
    run_eval(_settings("hardblink", model_dir, data, tmp_path, limit=2), progress=False)
    with pytest.raises(ValueError, match=r"spatial_cot \(saved True, now False\)"):
        run_eval(_settings("hardblink", model_dir, data, tmp_path, limit=2, spatial_cot=False, resume=True))


def test_first_mask_is_part_of_the_protocol_and_an_older_evaluation_resumes_without_it(
    model_dir: Path, world_dir: Path, tmp_path: Path
) -> None:
    args = {"split": "val", "limit": 2, "image_root": world_dir / "images"}
    run_eval(_settings("refcoco", model_dir, world_dir, tmp_path, **args), progress=False)
    saved = json.loads((tmp_path / "eval_settings.json").read_text())
    assert saved["first_mask"] is False
    with pytest.raises(ValueError, match=r"first_mask \(saved False, now True\)"):
        run_eval(_settings("refcoco", model_dir, world_dir, tmp_path, resume=True, first_mask=True, **args))
    del saved["first_mask"]  # as written before the setting existed: whole answers, every mask
    (tmp_path / "eval_settings.json").write_text(json.dumps(saved))
    run_eval(_settings("refcoco", model_dir, world_dir, tmp_path, resume=True, **args), progress=False)
    with pytest.raises(ValueError, match="first_mask"):
        (tmp_path / "eval_settings.json").write_text(json.dumps(saved))
        run_eval(_settings("refcoco", model_dir, world_dir, tmp_path, resume=True, first_mask=True, **args))


def test_mmbench_limit_keeps_whole_circular_groups(model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    settings = _settings("mmbench", model_dir, world_dir / "mmbench" / "val.tsv", tmp_path, limit=2)
    metrics = run_eval(settings, progress=False)
    assert metrics["num_questions"] == 2 and not metrics["incomplete_groups"]
    assert metrics["num_records"] > 2  # the copies of both questions


@pytest.mark.slow
def test_two_ranks_equal_one(model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    common = [
        "eval", "refcoco", "--model", str(model_dir), "--data", str(world_dir), "--split", "val", "--limit", "10",
        "--image-root", str(world_dir / "images"), "--batch-size", "3", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "perceptio", *common, "--out", str(tmp_path / "one")], env=env, capture_output=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "perceptio"]
    two = subprocess.run([*torchrun, *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())["metrics"]
    assert a == b
    assert (tmp_path / "one" / "predictions.jsonl").read_text() == (tmp_path / "two" / "predictions.jsonl").read_text()
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))


def test_summaries_sum_pixels_not_ratios() -> None:
    def line(i: int, u: int) -> dict:
        score = {"intersection": i, "union": u, "iou": 1.0 if u == 0 else i / (u + 1e-5)}
        return {"issues": [], "score": {**score, "empty_target": u == 0, "empty_prediction": i == 0, "num_masks": 1}}

    metrics = summarize("refcoco", [line(1, 2), line(90, 100), line(0, 0)])
    assert metrics["ciou"] == pytest.approx(91 / 102) and metrics["giou"] == pytest.approx((0.5 + 0.9 + 1) / 3, 1e-4)


def test_predict_writes_every_file(model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    """An image with two objects, a prompt answered with forced spatial tokens: answer, sequence, masks, overlay,
    depth. The untrained model's own choices are kept, so the files are checked against what it generated."""
    image = sorted((world_dir / "images").glob("*.png"))[0]
    prompt = "Please segment the red cube and the blue sphere in this image."
    result = CliRunner().invoke(
        app, ["predict", "--model", str(model_dir), "--image", str(image), "--prompt", prompt, "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / f"{image.stem}__p0"
    record = json.loads((folder / "prediction.json").read_text())
    assert record["prompt"] == prompt and "output" in record and "answer" in record
    assert record["image"] == str(image) and len(record["image_sha256"]) == 64
    assert (folder / "overlay.png").is_file()
    masks = sorted(folder.glob("mask_*.png"))
    assert len(masks) == record["num_masks"]
    assert (folder / "depth.png").is_file() == (record["depth_codes"] is not None)


def test_predict_python_api_with_two_objects(model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    """Forcing segmentation tokens and a span through the tokenizer: every file appears, sizes match the image."""
    from perceptio import Perceptio

    runner = Perceptio.from_pretrained(model_dir, device="cpu")
    image = Image.open(sorted((world_dir / "images").glob("*.png"))[1]).convert("RGB")
    prediction = runner.predict(image, "Please segment the two objects.", require_depth_span=True)
    assert prediction.depth is not None and prediction.depth.shape == (image.height, image.width)
    two = [np.zeros((image.height, image.width), bool), np.ones((image.height, image.width), bool)]
    prediction.masks = two  # as a model emitting two segmentation tokens would return
    folder = runner.save_prediction(prediction, image, tmp_path / "p", prompt="q")
    assert {p.name for p in folder.iterdir()} == {
        "prediction.json",
        "mask_0.png",
        "mask_1.png",
        "overlay.png",
        "depth.png",
    }
    assert Image.open(folder / "mask_1.png").size == image.size


@pytest.mark.slow
@pytest.mark.skipif(not HARDBLINK.is_dir(), reason="../shared/benchmarks/hardblink is not present")
def test_hardblink_runs_on_all_372_questions(model_dir: Path, tmp_path: Path) -> None:
    metrics = run_eval(_settings("hardblink", model_dir, HARDBLINK, tmp_path, spatial_cot=False), progress=False)
    assert metrics["count"] == 372
    assert set(metrics["answer"]["by_point_count"]) == {"3", "4", "5"} or set(metrics["answer"]["by_point_count"]) == {
        3,
        4,
        5,
    }


def test_a_limit_on_relative_depth_keeps_every_point_count(world_dir: Path) -> None:
    from collections import Counter

    from perceptio.eval.harness import EvalSettings, load_task_samples

    folder = world_dir / "hardblink" / "train"
    every = load_task_samples(EvalSettings(task="hardblink", model=Path("m"), data=folder, out=Path("o")))
    assert sorted({len(s.points) for s in every}) == [2, 3, 4, 5]
    kept = load_task_samples(EvalSettings(task="hardblink", model=Path("m"), data=folder, out=Path("o"), limit=6))
    counts = Counter(len(s.points) for s in kept)
    assert len(kept) == 6 and set(counts) == {2, 3, 4, 5} and max(counts.values()) == 2
    ids = {s.sample_id for s in kept}
    assert [s.sample_id for s in kept] == [s.sample_id for s in every if s.sample_id in ids]  # the readers' order


@pytest.mark.skipif(not HARDBLINK.is_dir(), reason="../shared/benchmarks/hardblink is not present")
def test_a_limit_on_the_real_benchmark_keeps_every_point_count() -> None:
    """Real HardBLINK questions carry no marker coordinates; the point count comes from their letters."""
    from collections import Counter

    from perceptio.eval.harness import EvalSettings, load_task_samples

    kept = load_task_samples(EvalSettings(task="hardblink", model=Path("m"), data=HARDBLINK, out=Path("o"), limit=30))
    counts = Counter(len(s.letters) for s in kept)
    assert len(kept) == 30 and counts == {3: 10, 4: 10, 5: 10}


def test_resume_refuses_predictions_of_other_weights_in_the_same_folder(world_dir: Path, tmp_path: Path) -> None:
    """A model retrained into the same folder is another model: its predictions must not merge with the old ones;
    the same weights moved to another folder resume."""
    import shutil

    first, processor = build_preset("tiny", seed=0)
    folder = save_model(first, processor, tmp_path / "model")
    data, out = world_dir / "hardblink" / "val", tmp_path / "eval"
    run_eval(_settings("hardblink", folder, data, out, limit=2), progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    run_eval(_settings("hardblink", moved, data, out, limit=2, resume=True), progress=False)  # same weights
    retrained, processor = build_preset("tiny", seed=1)
    save_model(retrained, processor, folder)
    with pytest.raises(ValueError, match="cannot resume with other settings: weights"):
        run_eval(_settings("hardblink", folder, data, out, limit=2, resume=True), progress=False)


def test_an_evaluation_encodes_an_image_once_for_all_its_expressions(
    world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consecutive expressions of one image reuse its frozen SAM2 features: fewer encoder calls, the same output."""
    from perceptio.eval import harness
    from perceptio.models.build import load_model
    from perceptio.weights import shipped

    model, processor = load_model(shipped("tiny-perceptio"))
    encoder = model.segmenter.get_image_features
    calls: list[int] = []
    monkeypatch.setattr(model.segmenter, "get_image_features", lambda *a, **k: calls.append(1) or encoder(*a, **k))
    runs = {}
    for budget in (0, harness.FEATURE_CACHE_BYTES):
        monkeypatch.setattr(harness, "FEATURE_CACHE_BYTES", budget)
        calls.clear()
        out = tmp_path / str(budget)
        settings = _settings("refcoco", shipped("tiny-perceptio"), world_dir, out, split="val", limit=12)
        run_eval(replace(settings, image_root=world_dir / "images"), progress=False, model=(model, processor))
        runs[budget] = len(calls), (out / "predictions.jsonl").read_text()
    (uncached, plain), (cached, fast) = runs[0], runs[harness.FEATURE_CACHE_BYTES]
    assert fast == plain and 0 < cached < uncached
    assert model.sam_feature_cache is None  # the model's own setting is back
