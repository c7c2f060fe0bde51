"""Bad items found before a long run starts: ``data.skip_bad`` decodes the training data up front and writes
``bad_items.json``; ``data check --format depth`` applies the depth tokenizer's rules to every map."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from perceptio.cli.main import app
from perceptio.config import load_config
from perceptio.data.errors import DataError
from perceptio.data.schema import depth_values_problem
from perceptio.train.config import TrainConfig
from perceptio.train.loop import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_synth.yaml"
runner = CliRunner()

#: Maps the depth tokenizer refuses, with the words its refusal uses.
UNUSABLE = {
    "all_nan": (np.full((8, 8), np.nan, dtype=np.float32), "no valid pixel"),
    "constant": (np.full((8, 8), 2.0, dtype=np.float32), "constant"),
    "negative": (np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), "positive"),
    "zero": (np.zeros((8, 8), dtype=np.float32), "positive"),
}


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
def test_depth_rules_name_the_problem(kind: str) -> None:
    values, words = UNUSABLE[kind]
    assert words in depth_values_problem(values, quantity="depth", valid=np.isfinite(values))
    assert depth_values_problem(np.linspace(1, 2, 64).reshape(8, 8), quantity="depth") is None


def test_data_check_refuses_depth_maps_the_tokenizer_would(tmp_path: Path) -> None:
    folder = tmp_path / "depth"
    folder.mkdir()
    convention = {"quantity": "depth", "metric": True, "units": "m", "scale": 1.0, "invalid_value": None}
    (folder / "depth.json").write_text(json.dumps({"convention": convention}))
    for name, (values, _) in {**UNUSABLE, "good": (np.linspace(1, 2, 64, dtype=np.float32).reshape(8, 8), "")}.items():
        np.save(folder / f"{name}.npy", values)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    strict = runner.invoke(app, ["data", "check", str(folder), "--format", "depth"])
    assert strict.exit_code == 2 and "depth-span target" in strict.output, strict.output
    report = tmp_path / "report.json"
    lenient = runner.invoke(
        app, ["data", "check", str(folder), "--format", "depth", "--skip-bad", "--report", str(report)]
    )
    assert lenient.exit_code == 0, lenient.output
    items = json.loads(report.read_text())["items"]
    assert sorted(Path(i["location"].split(" ")[0].rstrip(",:")).stem for i in items) == sorted(UNUSABLE), items


def _world_with_bad_items(world_dir: Path, tmp_path: Path) -> tuple[Path, str, str]:
    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    broken_image = sorted((world / "images").glob("*.png"))[0]
    broken_image.write_bytes(broken_image.read_bytes()[:100])  # cut short
    flat = sorted((world / "depth" / "train").glob("*.npy"))[-1]
    np.save(flat, np.full_like(np.load(flat), 3.0))  # a constant map: no relative depth
    return world, broken_image.stem, flat.stem


def _overrides(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={world}",
        "model.depth_tokenizer=null",
        f"run.out_dir={out}",
        "run.steps=2",
        "run.log_every=1",
        "run.checkpoint_every=0",
        "run.threads=1",
        "run.global_batch_size=4",
        "run.micro_batch_size=4",
        "eval.datasets={}",
        *extra,
    ]


def test_skip_bad_leaves_out_bad_training_items_before_step_0(world_dir: Path, tmp_path: Path) -> None:
    world, image, depth = _world_with_bad_items(world_dir, tmp_path)
    config = load_config(TrainConfig, TINY, _overrides(world, tmp_path / "run", "data.skip_bad=true"))
    result = train(config, progress=False)
    assert result.steps == 2
    report = json.loads((tmp_path / "run" / "bad_items.json").read_text())
    locations = " ".join(item["location"] for item in report["items"])
    problems = " ".join(item["problem"] for item in report["items"])
    assert f"{image}.png" in locations and f"{depth}.npy" in locations
    assert "constant" in problems
    # every dataset that uses the broken image lost exactly those samples, and nothing else
    assert report["num_skipped"] == len(report["items"]) > 2


def test_without_skip_bad_a_bad_depth_map_stops_before_training(world_dir: Path, tmp_path: Path) -> None:
    world, _, depth = _world_with_bad_items(world_dir, tmp_path)
    config = load_config(TrainConfig, TINY, _overrides(world, tmp_path / "run"))
    with pytest.raises(DataError, match=f"{depth}|constant"):
        train(config, progress=False)
