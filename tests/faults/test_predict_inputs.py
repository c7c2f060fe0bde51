"""`predict`'s inputs and outputs (issue 13): output folders are unique and stable for any set of inputs and
record the image path and hash (finding 2); in-memory images pass the checks image files pass (finding 13); a
JSONL line with a null prompt is an error naming the file and line (finding 16)."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from perceptio.cli.main import app
from perceptio.data.errors import DataError
from perceptio.data.schema import load_rgb
from perceptio.inference import Perceptio, prediction_folder_names, read_prompts_jsonl
from perceptio.models import build_preset, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, processor = build_preset("tiny", seed=0)
    return save_model(model, processor, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> Perceptio:
    return Perceptio.from_pretrained(model_dir, device="cpu")


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------ output folders


def test_predict_gives_each_image_its_own_folder_and_records_the_source(model_dir: Path, tmp_path: Path) -> None:
    images = [_png(tmp_path / "coll" / "a.png", 0), _png(tmp_path / "coll" / "a_1.png", 1)]
    images.append(_png(tmp_path / "coll" / "d2" / "a.png", 2))
    out = tmp_path / "P"
    args = ["predict", "--model", str(model_dir), "--prompt", "What color is it?", "--out", str(out)]
    result = CliRunner().invoke(app, args + [x for image in images for x in ("--image", str(image))])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"a__p0", "a_1__p0", "d2__a__p0"}
    for folder, image in zip(["a__p0", "a_1__p0", "d2__a__p0"], images, strict=True):
        record = json.loads((out / folder / "prediction.json").read_text())
        assert record["image"] == str(image)
        assert record["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        assert record["prompt"] == "What color is it?"


def test_folder_names_are_stable_and_unique(tmp_path: Path) -> None:
    root = tmp_path / "coll"
    paths = [root / "a.png", root / "a_1.png", root / "d2" / "a.png", root / "a.png"]
    names = prediction_folder_names(paths)
    assert names == ["a__p0", "a_1__p0", "d2__a__p0", "a__p1"]  # the second prompt about a.png: p1
    assert prediction_folder_names(paths) == names  # the same inputs, the same folders
    for order in itertools.permutations(range(3)):  # the same set in another order: each image keeps its name
        again = prediction_folder_names([paths[k] for k in order])
        assert [again[order.index(k)] for k in range(3)] == names[:3]
    relative = prediction_folder_names([Path("coll/d2/a.png"), Path("coll/./a.png"), Path("coll/a.png")])
    assert relative == ["d2__a__p0", "a__p0", "a__p1"]  # relative paths work alike; ./ is the same file


def test_names_that_would_clash_get_a_hash_of_the_path(tmp_path: Path) -> None:
    root = tmp_path / "coll"
    paths = [root / "a.png", root / "a.jpg", root / "A.png", root / "b.png", root / "a.png"]
    names = prediction_folder_names(paths)
    assert len({name.casefold() for name in names}) == len(names)  # unique, on a case-insensitive disk too
    assert names[0].startswith("a__") and names[1].startswith("a__") and names[2].startswith("A__")
    assert names[3] == "b__p0" and names[4] == names[0].replace("__p0", "__p1")
    assert prediction_folder_names(paths) == names


def test_a_file_named_like_a_folder_path_does_not_clash(tmp_path: Path) -> None:
    names = prediction_folder_names([tmp_path / "d2__a.png", tmp_path / "d2" / "a.png", tmp_path / "b.png"])
    assert len(set(names)) == 3 and names[2] == "b__p0"


# ---------------------------------------------------------------------------------------- in-memory images


def _sixteen_bit() -> Image.Image:
    return Image.fromarray(np.full((20, 30), 30000, dtype=np.uint16))


def _transparent(mode: str) -> Image.Image:
    rgba = Image.new("RGBA", (30, 20), (200, 10, 10, 255))
    rgba.putpixel((3, 4), (0, 0, 0, 0))
    if mode == "P":
        palette = Image.new("P", (30, 20), 1)
        palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
        palette.putpixel((3, 4), 0)
        palette.info["transparency"] = 0
        return palette
    return rgba.convert(mode)


BAD_IMAGES = {
    "16-bit": (_sixteen_bit, "single-channel 16/32-bit"),
    "32-bit": (lambda: _sixteen_bit().convert("I"), "single-channel 16/32-bit"),
    "RGBA": (lambda: _transparent("RGBA"), "transparent pixels"),
    "LA": (lambda: _transparent("LA"), "transparent pixels"),
    "P": (lambda: _transparent("P"), "transparent pixels"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_an_in_memory_image_gets_the_error_its_file_gets(runner: Perceptio, tmp_path: Path, kind: str) -> None:
    make, message = BAD_IMAGES[kind]
    image = make()
    path = tmp_path / ("bad.tiff" if image.mode == "I" else "bad.png")  # PNG has no 32-bit mode
    image.save(path)
    with pytest.raises(DataError, match=message) as from_file:
        load_rgb(path)
    with pytest.raises(DataError, match=message) as in_memory:
        runner.predict(image, "What color is it?")
    assert in_memory.value.problem == from_file.value.problem
    with pytest.raises(DataError, match=message):
        runner.processor([image], ["What color is it?"])
    prediction = runner.predict(_png(tmp_path / "ok.png", 3), "q", max_new_tokens=2)
    with pytest.raises(DataError, match=message):
        runner.save_prediction(prediction, image, tmp_path / "saved")


def test_in_memory_images_that_convert_cleanly_still_work(runner: Perceptio) -> None:
    opaque = Image.new("RGBA", (30, 20), (200, 10, 10, 255))
    grey = Image.new("L", (30, 20), 90)
    predictions = runner.predict([opaque, grey], ["What color is it?", "What color is it?"], max_new_tokens=3)
    assert len(predictions) == 2
    batch = runner.processor([opaque], ["q"])
    assert batch["sam_pixel_values"].shape[0] == 1


# ------------------------------------------------------------------------------------------------- JSONL


def test_a_null_prompt_is_an_error_naming_the_file_and_line(model_dir: Path, tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 0)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"image": "a.png", "prompt": "q"}\n\n{"image": "a.png", "prompt": null}\n')
    result = CliRunner().invoke(app, ["predict", "--model", str(model_dir), "--jsonl", str(jsonl), "--out", "o"])
    assert result.exit_code == 2
    assert f"{jsonl}:3" in result.output and '"prompt" must be a string, got null' in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "a.png"}', '"prompt" must be a string, got nothing'),
        ('{"image": "a.png", "prompt": 3}', '"prompt" must be a string, got 3'),
        ('{"image": null, "prompt": "q"}', '"image" must be a non-empty path, got null'),
        ('["a.png", "q"]', "got list"),
        ('{"image": "a.png", "prompt": "q"', "not JSON"),
    ],
)
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"image": "a.png", "prompt": "q"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_prompts_jsonl(jsonl)
    assert err.value.path == str(jsonl) and err.value.line == 2


def test_a_missing_or_binary_jsonl_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_prompts_jsonl(tmp_path / "missing.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        read_prompts_jsonl(binary)
    good = tmp_path / "good.jsonl"
    good.write_text('{"image": "sub/a.png", "prompt": ""}\n{"image": "/abs/b.png", "prompt": "[SEG] q"}\n')
    assert read_prompts_jsonl(good) == [(tmp_path / "sub" / "a.png", ""), (Path("/abs/b.png"), "[SEG] q")]
