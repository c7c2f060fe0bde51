"""The grounding ladder: the levels' data, the image-use gap, and a shortened ladder that fails when the model
does not learn to read one small object's colour (L1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from perceptio.cli.main import app
from perceptio.experiments.grounding import GroundingConfig, answer_prior, level_items, run_job


def test_flat_levels_hold_the_named_colour(tmp_path: Path) -> None:
    config = GroundingConfig(out=tmp_path, levels=("L0", "L1"), train_images=20, val_images=10)
    from perceptio.experiments.grounding import _palette

    palette = _palette()
    for level in ("L0", "L1"):
        train, val = level_items(level, config)
        assert len(train) == 20 and len(val) == 10
        for item in train[:5]:
            pixels = np.asarray(item.image).reshape(-1, 3).astype(int)
            match = (np.abs(pixels - palette[item.answer]) <= 10).all(1).mean()
            # L0: the whole image is the colour (up to noise); L1: exactly the object's 8x8 pixels
            assert match > 0.95 if level == "L0" else match == pytest.approx(64 / 128**2, abs=2e-4)


def test_world_levels_read_their_question_kinds(world_dir: Path, tmp_path: Path) -> None:
    config = GroundingConfig(out=tmp_path, world=world_dir, levels=("L2", "L3", "L4"), val_images=50)
    kinds = {"L2": {"color", "shape"}, "L3": {"spatial"}, "L4": {"count"}}
    for level, expected in kinds.items():
        train, val = level_items(level, config)
        assert {i.kind for i in train} <= expected and {i.kind for i in val} <= expected
        assert 0.0 <= answer_prior(train, val) <= 1.0
    with pytest.raises(ValueError, match="give --world"):
        GroundingConfig(out=tmp_path, levels=("L2",))
    with pytest.raises(ValueError, match="unknown arm"):
        GroundingConfig(out=tmp_path, levels=("L0",), arms=("magic",))


def test_answer_prior_is_the_majority_answer_per_kind() -> None:
    from perceptio.experiments.grounding import LadderItem

    def item(answer: str, kind: str) -> LadderItem:
        return LadderItem(None, "q", answer, kind)

    train = [item("red", "color"), item("red", "color"), item("blue", "color"), item("cube", "shape")]
    val = [item("red", "color"), item("blue", "color"), item("cube", "shape"), item("sphere", "shape")]
    assert answer_prior(train, val) == 0.5


def test_shortened_ladder_learns_to_read_one_small_object(tmp_path: Path) -> None:
    """The ladder's L1 in ~10 s: with the tiny preset's default image tokens the model must read the colour of one
    8-px square; without centring (the baseline arm) it stays at chance and ignores the image."""
    config = GroundingConfig(out=tmp_path, levels=("L1",), steps=250, eval_every=250, train_images=600, val_images=120)
    learned = run_job(config, "L1", "standardize", seed=0)
    assert learned["final"]["accuracy"] >= 0.6, learned["curve"]
    assert learned["final"]["image_use_gap"] > 1.0
    assert learned["final"]["shuffled_accuracy"] < 0.4  # with other images' pixels the answers are wrong


@pytest.mark.slow
def test_baseline_arm_is_the_control_that_ignores_the_image(tmp_path: Path) -> None:
    config = GroundingConfig(out=tmp_path, levels=("L1",), steps=250, eval_every=250, train_images=600, val_images=120)
    ignored = run_job(config, "L1", "baseline", seed=0)
    assert ignored["final"]["accuracy"] < 0.3
    assert abs(ignored["final"]["image_use_gap"]) < 0.05


@pytest.mark.slow  # end to end: four training jobs and their evaluations in processes of their own (about 20 s)
def test_cli_runs_tabulates_and_reuses_jobs(world_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ladder"
    args = ["experiment", "grounding", "--out", str(out), "--world", str(world_dir), "--levels", "L0,L2",
            "--arms", "baseline,center", "--steps", "4", "--eval-every", "2", "--train-images", "16",
            "--val-images", "8", "--jobs", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| L0 whole-image colour |" in result.output and "(gap" in result.output
    assert "  L2 center seed 0: done, accuracy " in result.output and "image-use gap" in result.output
    assert "--- L0 baseline seed 0 ---" in (out / "jobs" / "L0-baseline-s0.log").read_text()  # its own log
    summary = json.loads((out / "results.json").read_text())
    assert {(j["level"], j["arm"]) for j in summary["jobs"]} == {
        ("L0", "baseline"),
        ("L0", "center"),
        ("L2", "baseline"),
        ("L2", "center"),
    }
    assert [c["step"] for c in summary["jobs"][0]["curve"]] == [0, 2, 4]
    from PIL import Image

    with Image.open(out / "results.png") as plot:  # accuracy against steps, drawn by matplotlib
        assert plot.width > 300 and plot.height > 200
    again = CliRunner().invoke(app, args)
    assert again.output.count("finished earlier") == 4
    one = [*args[: args.index("--levels")], "--levels", "L0", "--arms", "baseline", *args[args.index("--steps") :]]
    changed = CliRunner().invoke(app, [*one, "--lr", "0.01"])  # one job: each one is a new process (seconds)
    assert changed.exit_code == 0 and "L0 baseline seed 0: started" in changed.output
    assert "finished earlier" not in changed.output
    bad = CliRunner().invoke(app, ["experiment", "grounding", "--out", str(out), "--levels", "L9"])
    assert bad.exit_code == 2 and "unknown level" in bad.output


def test_swap_spans_gives_each_row_the_previous_rows_codes() -> None:
    import torch

    from perceptio.experiments.grounding import swap_spans

    codes = range(100, 110)
    ids = torch.tensor([[1, 2, 101, 102, 103, 5], [1, 104, 105, 106, 5, 0]])
    labels = torch.tensor([[-100, -100, 101, 102, 103, 5], [-100, 104, 105, 106, 5, -100]])
    swapped = swap_spans(ids, labels, codes)
    assert swapped.tolist() == [[1, 2, 104, 105, 106, 5], [1, 101, 102, 103, 5, 0]]
    assert ids[0, 2] == 101  # the input is left as it was
    with pytest.raises(ValueError, match="same, non-zero number"):
        swap_spans(ids, torch.tensor([[-100, -100, 101, 102, 103, 5], [-100, 104, 105, 5, 5, -100]]), codes)


def test_level_l5_reads_the_letter_after_the_span(world_dir: Path, tmp_path: Path) -> None:
    """L5 end to end on a few questions: the full Perceptio forward with a depth tokenizer, the letter prior per
    marker count, and both controls (shuffled images, swapped spans) recorded at every point of the curve."""
    from perceptio.models import PRESETS
    from perceptio.tokenizers.depth import DepthTokenizer

    text_tokenizer = PRESETS["tiny"].text_tokenizer()
    DepthTokenizer(PRESETS["tiny"].config(text_tokenizer).depth_tokenizer).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="depth tokenizer"):
        GroundingConfig(out=tmp_path, world=world_dir, levels=("L5",), arms=("standardize",))
    config = GroundingConfig(
        out=tmp_path / "ladder", world=world_dir, levels=("L5",), arms=("standardize",), steps=2, eval_every=2,
        train_images=8, val_images=8, tokenizer=tmp_path / "tokenizer", jobs=1,
    )  # fmt: skip
    result = run_job(config, "L5", "standardize", seed=0)
    assert [p["step"] for p in result["curve"]] == [0, 2] and 0.0 <= result["prior"] <= 1.0
    for point in result["curve"]:
        assert 0.0 <= point["accuracy"] <= 1.0 and 0.0 <= point["code_accuracy"] <= 1.0
        assert {"swapped_accuracy", "span_use_gap", "image_use_gap"} <= set(point)
    assert result["curve"][-1]["loss"] < result["curve"][0]["loss"]  # two steps on the letters already help
