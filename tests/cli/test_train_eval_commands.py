"""Bad input to `perceptio train`, `predict`, `eval` and `segmenter pretrain`: exit code 2 and a message that
names the file, line or key and the fix."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from perceptio.cli.main import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _fails(args: list[str], *fragments: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_train_names_a_missing_recipe_and_a_missing_dataset(world_dir: Path, tmp_path: Path) -> None:
    _fails(["train", "--config", str(tmp_path / "nope.yaml")], "recipe not found", "nope.yaml")
    recipe = str(REPO / "configs" / "tiny_synth.yaml")
    _fails(
        [
            "train", "--config", recipe, f"data.root={world_dir}", "model.depth_tokenizer=null",
            f"run.out_dir={tmp_path / 'run'}", "data.datasets.vqa.path=vqa/missing.json",
        ],
        "dataset 'vqa'",
        "not found",
        "data.datasets.<name>.path",
    )  # fmt: skip


def test_predict_rejects_bad_jsonl_and_missing_images(tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"image": "a.png", "prompt": "x"}\n{"image": "b.png"}\n')
    model = str(tmp_path / "model")
    _fails(["predict", "--model", model, "--jsonl", str(items), "--out", str(tmp_path)], "items.jsonl:2", '"prompt"')
    _fails(
        ["predict", "--model", model, "--image", str(tmp_path / "none.png"), "--prompt", "q", "--out", str(tmp_path)],
        "image not found",
        "none.png",
    )
    _fails(["predict", "--model", model, "--out", str(tmp_path)], "nothing to predict")
    _fails(["predict", "--model", model, "--image", str(items), "--out", str(tmp_path)], "--image needs --prompt")


def test_eval_rejects_unknown_tasks_and_missing_data(tmp_path: Path) -> None:
    args = ["--model", str(tmp_path), "--out", str(tmp_path / "out")]
    _fails(["eval", "coco", "--data", str(tmp_path), *args], "unknown task 'coco'", "refcoco")
    _fails(["eval", "hardblink", "--data", str(tmp_path / "missing"), *args], "missing")


def test_segmenter_pretrain_rejects_a_folder_without_refer_files(tmp_path: Path) -> None:
    _fails(["segmenter", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "sam")], str(tmp_path))
