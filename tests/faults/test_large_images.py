"""Huge images are refused before decoding, with an error that names the file (issue: an 8000x8000 PNG took
8.5 GB; a 14000x14000 one raised an uncaught DecompressionBombError)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from perceptio.data import schema
from perceptio.data.errors import DataError
from perceptio.data.schema import load_rgb


def test_an_image_over_the_pixel_limit_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    assert load_rgb(path).size == (40, 30)
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"big\.png.*40x30 pixels, over the limit"):
        load_rgb(path)


def test_a_decompression_bomb_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice this
    with pytest.raises(DataError, match=r"bomb\.png.*decompression bomb"):
        load_rgb(path)


def test_predict_names_an_undecodable_image_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from perceptio.cli.main import app

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = CliRunner().invoke(app, ["predict", "--out", str(tmp_path / "p"), "--image", str(bad), "--prompt", "hi"])
    assert result.exit_code == 2 and "bad.png: image cannot be decoded" in result.output
    assert "Traceback" not in result.output


def test_large_jpegs_shrink_while_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_side`` decodes a JPEG at a reduced scale: a JPEG over the pixel limit loads when its reduced size is
    within it (a PNG cannot be decoded at a reduced scale and is still refused)."""
    big = tmp_path / "big.jpg"
    Image.new("RGB", (800, 400), (200, 30, 30)).save(big, quality=80)
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 100_000)  # 800x400 = 320,000 pixels: over the limit
    with pytest.raises(DataError, match="over the limit"):
        load_rgb(big)
    small = load_rgb(big, max_side=200)
    assert small.size == (200, 100) and small.mode == "RGB"
    assert abs(small.getpixel((100, 50))[0] - 200) < 8  # the colour survives the reduced decode
    png = tmp_path / "big.png"
    Image.new("RGB", (800, 400)).save(png)
    with pytest.raises(DataError, match="over the limit"):
        load_rgb(png, max_side=200)
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 10_000_000)
    assert load_rgb(png, max_side=200).size == (200, 100)  # within the limit: decoded, then shrunk
