"""`perceptio data synth/show/check`, called as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from perceptio.cli.main import app

runner = CliRunner()


def test_synth_writes_the_world_and_prints_counts(tmp_path: Path) -> None:
    out = tmp_path / "world"
    result = runner.invoke(
        app, ["data", "synth", "--out", str(out), "--num-images", "12", "--seed", "3", "--size", "64"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 12 and manifest["config"]["image_size"] == 64
    assert "images" in result.output and "relative depth, 2 points" in result.output
    total_line = next(line for line in result.output.splitlines() if line.startswith("images"))
    assert total_line.split()[-1] == "12"
    assert Image.open(out / "images" / "synth_000000.png").size == (64, 64)

    again = runner.invoke(app, ["data", "synth", "--out", str(out), "--num-images", "12"])
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output


def test_show_draws_a_contact_sheet(world_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    result = runner.invoke(app, ["data", "show", str(world_dir), "--out", str(out), "--n", "4", "--split", "train"])
    assert result.exit_code == 0, result.output
    sheet = Image.open(out)
    assert sheet.width > 3 * 128 and sheet.height > 2 * 128
    # the sheet is not blank: it holds images, depth colours and text
    assert len(np.unique(np.asarray(sheet.convert("RGB")).reshape(-1, 3), axis=0)) > 200


def test_show_explains_a_wrong_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "show", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "manifest.json" in result.output and "perceptio data synth" in result.output


def test_check_passes_on_the_world_and_reports_broken_items(world_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(world_dir / "hardblink" / "val"), "--format", "hardblink"])
    assert result.exit_code == 0, result.output
    assert "bad item(s) skipped" in result.output and " 0 bad" in result.output

    broken = tmp_path / "hb"
    (broken / "questions").mkdir(parents=True)
    (broken / "answers").mkdir()
    (broken / "images" / "blink3pointscenter").mkdir(parents=True)
    q = {"question_id": 0, "image": "0.png", "text": "Which point is the closest to the camera?"}
    (broken / "questions" / "blink_3pointscenter_questions.jsonl").write_text(json.dumps(q) + "\n{not json\n")
    (broken / "answers" / "blink_3pointscenter_answers.jsonl").write_text(
        json.dumps({"question_id": 0, "text": "(B)"}) + "\n"
    )
    (broken / "images" / "blink3pointscenter" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    strict = runner.invoke(app, ["data", "check", str(broken), "--format", "hardblink"])
    assert strict.exit_code == 2
    assert "blink_3pointscenter_questions.jsonl:2" in strict.output and "--skip-bad" in strict.output

    report = tmp_path / "report.json"
    lenient = runner.invoke(
        app, ["data", "check", str(broken), "--format", "hardblink", "--skip-bad", "--report", str(report)]
    )
    # every item was bad: the report is written, and the check still fails (nothing here is usable)
    assert lenient.exit_code == 2 and "no sample of" in lenient.output, lenient.output
    payload = json.loads(report.read_text())
    assert payload["num_skipped"] == 2  # the malformed line, and the undecodable image
    locations = [item["location"] for item in payload["items"]]
    assert any("questions.jsonl:2" in loc for loc in locations) and any("0.png" in loc for loc in locations)


def test_check_rejects_an_unknown_format_and_options_the_format_does_not_take(world_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--format", "coco"])
    assert result.exit_code == 2 and "unknown --format 'coco'" in result.output
    tsv = world_dir / "mmbench" / "val.tsv"
    result = runner.invoke(app, ["data", "check", str(tsv), "--format", "mmbench", "--split", "val"])
    assert result.exit_code == 2 and "--format mmbench does not take --split" in result.output
    result = runner.invoke(app, ["data", "check", str(tsv), "--format", "mmbench"])
    assert result.exit_code == 0 and "0 bad item(s)" in result.output
    depth = [
        "data",
        "check",
        str(world_dir / "depth" / "val"),
        "--format",
        "depth",
        "--image-root",
        str(world_dir / "images"),
    ]
    result = runner.invoke(app, depth)
    assert result.exit_code == 0, result.output
