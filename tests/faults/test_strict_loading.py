"""Damaged model folders: a missing, unexpected or mis-shaped tensor is an error naming the tensors (not a random
layer with a library warning); an empty or cut-short safetensors file is an error naming the file; `strict=False`
is the explicit way to load part of a model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from perceptio.models.build import build_preset, load_model, save_model
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration, WeightsMismatchError
from perceptio.tokenizers.depth import DepthTokenizer, DepthTokenizerConfig
from perceptio.utils.weights_files import CorruptWeightsError

REPO = Path(__file__).resolve().parents[2]
DROPPED = "depth_tokenizer.decoder.0.weight"  # the case: one depth-decoder tensor deleted
RESHAPED = "seg_projection.0.weight"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny model saved by save_model, and its state dict (in the model's own names) before saving."""
    model, processor = build_preset("tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return save_model(model, processor, tmp_path_factory.mktemp("tiny") / "model"), state


@pytest.fixture(scope="module")
def saved(built: tuple[Path, dict[str, torch.Tensor]]) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def original(built: tuple[Path, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return built[1]


def _copy(saved: Path, tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    if change is not None:
        weights = load_file(str(folder / "model.safetensors"))
        change(weights)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _drop(weights: dict[str, torch.Tensor]) -> None:
    del weights[DROPPED]


def _add(weights: dict[str, torch.Tensor]) -> None:
    weights["depth_tokenizer.extra.weight"] = torch.zeros(3)


def _reshape(weights: dict[str, torch.Tensor]) -> None:
    rows, cols = weights[RESHAPED].shape
    weights[RESHAPED] = torch.zeros(rows, cols + 1)


def _cut(folder: Path, where: str) -> Path:
    """Cut ``model.safetensors`` short: to nothing, inside the header, just after it, or by its last byte."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    keep = {"0-byte": 0, "in-the-header": header_end // 2, "after-the-header": header_end + 10, "last-byte": -1}
    path.write_bytes(data[: keep[where]])
    return path


def test_a_saved_model_round_trips_with_nothing_missing(saved: Path, original: dict[str, torch.Tensor]) -> None:
    model, info = PerceptioForConditionalGeneration.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())
    loaded, processor = load_model(saved)  # the library path: strict, no error
    assert processor.text_tokenizer is not None
    assert not any(p.requires_grad for p in loaded.depth_tokenizer.parameters()), "frozen parts stay frozen"


def test_a_missing_tensor_is_an_error_naming_it(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path, _drop)
    with pytest.raises(WeightsMismatchError, match=rf"missing tensor\(s\) {DROPPED}\b") as caught:
        load_model(folder)
    assert caught.value.missing == [DROPPED] and not caught.value.unexpected and not caught.value.mismatched
    assert str(folder / "model.safetensors") in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError), "the CLI's one-line errors catch ValueError"


def test_an_unexpected_tensor_is_an_error_naming_it(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path, _add)
    with pytest.raises(WeightsMismatchError, match=r"unexpected tensor\(s\) depth_tokenizer\.extra\.weight"):
        PerceptioForConditionalGeneration.from_pretrained(folder)


def test_a_mis_shaped_tensor_is_an_error_naming_it_and_both_shapes(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path, _reshape)
    with pytest.raises(WeightsMismatchError, match=rf"mis-shaped tensor\(s\) {RESHAPED} \(file \[64, 65\], model"):
        load_model(folder)
    with pytest.raises(WeightsMismatchError, match="ignore_mismatched_sizes"):  # not even a partial load takes it
        load_model(folder, strict=False)


def test_several_problems_are_named_together(saved: Path, tmp_path: Path) -> None:
    def change(weights: dict[str, torch.Tensor]) -> None:
        _drop(weights)
        _add(weights)
        _reshape(weights)

    with pytest.raises(WeightsMismatchError, match="missing.*unexpected.*mis-shaped") as caught:
        load_model(_copy(saved, tmp_path, change))
    assert caught.value.mismatched[0][0] == RESHAPED


@pytest.mark.parametrize("where", ["0-byte", "in-the-header", "after-the-header", "last-byte"])
def test_an_empty_or_cut_short_file_is_an_error_naming_it(where: str, saved: Path, tmp_path: Path) -> None:
    path = _cut(_copy(saved, tmp_path), where)
    message = "empty" if where == "0-byte" else "not a whole safetensors"
    with pytest.raises(CorruptWeightsError, match=message) as caught:
        load_model(path.parent)
    assert caught.value.path == path and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_strict_false_is_the_explicit_partial_load(
    saved: Path, original: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    folder = _copy(saved, tmp_path, lambda w: (_drop(w), _add(w)))
    model, _ = load_model(folder, strict=False)  # the missing tensor is initialised, the extra one dropped
    state = model.state_dict()
    assert state.keys() == original.keys() and state[DROPPED].shape == original[DROPPED].shape
    assert all(torch.equal(state[k], v) for k, v in original.items() if k != DROPPED)
    assert not torch.equal(state[DROPPED], original[DROPPED]), "initialised afresh, as asked"
    reshaped = _copy(saved, tmp_path / "reshaped", _reshape)
    model = PerceptioForConditionalGeneration.from_pretrained(reshaped, strict=False, ignore_mismatched_sizes=True)
    assert model.seg_projection[0].weight.shape == original[RESHAPED].shape


def test_a_cut_short_depth_tokenizer_is_an_error_naming_it(tmp_path: Path) -> None:
    DepthTokenizer(DepthTokenizerConfig.from_preset("tiny")).save_pretrained(tmp_path)
    path = _cut(tmp_path, "after-the-header")
    with pytest.raises(CorruptWeightsError, match="not a whole safetensors") as caught:
        DepthTokenizer.from_pretrained(tmp_path)
    assert str(path) in str(caught.value)


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_predict_on_a_damaged_folder_is_one_line_and_exit_2(damage: str, saved: Path, tmp_path: Path) -> None:
    from perceptio.cli.main import app

    if damage == "missing":
        folder = _copy(saved, tmp_path, _drop)
    else:
        folder = _cut(_copy(saved, tmp_path), "after-the-header").parent
    args = ["predict", "--model", str(folder), "--image", str(_image(tmp_path)), "--prompt", "What is it?"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and (DROPPED if damage == "missing" else "model.safetensors") in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_process_prints_one_line_for_a_missing_tensor(saved: Path, tmp_path: Path) -> None:
    """The real command in its own process: stderr is the one error line (transformers' multi-line load report is
    held back; the error names the same tensor)."""
    folder = _copy(saved, tmp_path, _drop)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "perceptio", "predict", "--model", str(folder), "--image", str(_image(tmp_path))]
        + ["--prompt", "What is it?", "--out", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and DROPPED in lines[0], result.stderr
