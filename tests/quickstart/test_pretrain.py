"""``perceptio pretrain``: the tiny base's stages, its model card and checksums, reuse, and fine-tuning from it;
and the shipped weights' checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perceptio.cli.main import app
from perceptio.weights import SHIPPED, shipped, verify

runner = CliRunner()
SMALL = ["--tokenizer-steps", "2", "--segmenter-steps", "2", "run.steps=3", "run.checkpoint_every=2", "eval.every=0"]


def test_pretrain_writes_a_base_that_fine_tuning_starts_from(world_dir: Path, tmp_path: Path) -> None:
    import shutil

    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    out = tmp_path / "base"
    result = runner.invoke(app, ["pretrain", "--out", str(out), "--world", str(world), *SMALL])
    assert result.exit_code == 0, result.output
    base = out / "base"
    verify(base)
    card = (base / "MODEL_CARD.md").read_text()
    assert f"perceptio pretrain --out {out}" in card and "3 of batch 32" in card
    assert "| image-use gap, vqa (val) |" in card  # does the base look? measured on its validation questions
    assert (world / "alignment" / "train.json").is_file() and (world / "manifest.json").is_file()
    config = json.loads((base / "config.json").read_text())
    assert config["image_token_norm"] == "standardize"
    # the base learned no spatial tokens: its training data hold none
    records = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert all(r.get("terms", {}).get("depth_token", 0.0) == 0.0 for r in records if "terms" in r)

    again = runner.invoke(app, ["pretrain", "--out", str(out), "--world", str(world), *SMALL])
    assert again.exit_code == 0 and again.output.count("finished earlier") == 6

    (base / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(ValueError, match="model.safetensors does not match"):
        verify(base)


def test_pretrain_refuses_a_folder_that_is_not_a_world(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "b"), "--world", str(tmp_path), *SMALL])
    assert result.exit_code == 2 and "manifest.json not found" in result.output


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_match_their_model_card(name: str) -> None:
    try:
        folder = shipped(name)
    except FileNotFoundError as err:
        pytest.fail(f"{err}: the shipped weights are part of the repository")
    verify(folder)
    card = (folder / "MODEL_CARD.md").read_text()
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, _, file_name = line.partition("  ")
        assert f"`{file_name}`: `{digest}`" in card  # the card names the same hashes as the checksums


def test_the_shipped_model_predicts_with_no_training(world_dir: Path, tmp_path: Path) -> None:
    from perceptio.inference import Perceptio

    image = sorted((world_dir / "images").glob("*.png"))[0]
    model = Perceptio.from_pretrained(device="cpu")  # the shipped tiny-perceptio
    assert model.model.config.image_token_norm == "standardize"
    prediction = model.predict(image, "Please segment the red sphere.")
    assert prediction.text and prediction.masks is not None
    result = runner.invoke(app, ["predict", "--out", str(tmp_path / "p"), "--image", str(image), "--prompt", "Hi"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p").rglob("prediction.json"))) == 1
