"""check_samples (full decoding with located errors), image-mode handling, and the shared reader helpers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import check_sample, check_samples
from perceptio.data.readers._common import iter_jsonl, parse_letter, to_int
from perceptio.data.schema import ImageRef, MaskRef, Point, Sample, Task

RECT = [[1, 1, 5, 1, 5, 4, 1, 4]]  # 4 x 3 = 12 px


def _sample(sample_id: str, image: ImageRef, **fields: object) -> Sample:
    return Sample(sample_id, Task.REFERRING_SEGMENTATION, "test", images=(image,), **fields)


@pytest.fixture()
def good(tmp_path):
    path = tmp_path / "good.png"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(path)
    return path


def test_good_sample_passes_and_mask_decodes(good) -> None:
    sample = _sample("ok", ImageRef(path=good), masks=(MaskRef(RECT, 6, 8, name="ann 1"),), points=(Point("A", 7, 5),))
    check_sample(sample)
    assert sample.target_mask().sum() == 12
    assert check_samples([sample, sample], progress=True) == 2  # with a progress bar on stderr


def test_mask_size_mismatch_names_sample_and_mask(good) -> None:
    sample = _sample("s1", ImageRef(path=good), masks=(MaskRef(RECT, 10, 8, name="instances.json [ann 7]"),))
    with pytest.raises(DataError) as err:
        check_samples([sample], progress=False)
    assert str(err.value) == (
        f"instances.json [ann 7] [sample s1]: mask is 10x8 but its image {good} is 6x8 (HxW). "
        "Fix: the mask was made for another image or resolution; check the annotation's height/width"
    )


def test_truncated_image_and_skip_bad_report(good, tmp_path) -> None:
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    samples = [
        _sample("a", ImageRef(path=good)),
        _sample("b", ImageRef(path=truncated)),
        _sample("c", ImageRef(path=tmp_path / "missing.png")),
        _sample("d", ImageRef(path=good), points=(Point("A", 8.0, 1.0),)),
    ]
    with pytest.raises(DataError, match=r"cut\.jpg \[sample b\]: image cannot be decoded .*truncated"):
        check_samples(samples, progress=False)
    report = BadItemReport()
    assert check_samples(samples, skip_bad=True, report=report, progress=False) == 1
    assert [item.location for item in report.items] == [
        f"{truncated} [sample b]",
        f"{tmp_path / 'missing.png'} [sample c]",
        f"{good} [sample d]",
    ]
    assert report.items[1].problem == "image file not found"
    assert report.items[2].problem == "point A at (8.0, 1.0) lies outside the 8x6 image"


def test_image_modes(tmp_path) -> None:
    rgba = tmp_path / "rgba.png"
    pixels = np.full((4, 4, 4), 255, dtype=np.uint8)
    pixels[0, 0, 3] = 0
    Image.fromarray(pixels).save(rgba)
    with pytest.raises(DataError, match=r"rgba\.png: image has mode 'RGBA' with 1 transparent pixels"):
        ImageRef(path=rgba).load()
    opaque = tmp_path / "opaque.png"
    Image.new("RGBA", (4, 4), (9, 8, 7, 255)).save(opaque)
    assert ImageRef(path=opaque).load().getpixel((0, 0)) == (9, 8, 7)

    depth_like = tmp_path / "depth16.png"
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(depth_like)
    with pytest.raises(DataError, match=r"depth16\.png \[sample dm\]: image has mode 'I;16'.*looks like a depth map"):
        check_samples([_sample("dm", ImageRef(path=depth_like))], progress=False)

    gray = tmp_path / "gray.png"
    Image.new("L", (5, 3), 77).save(gray)
    palette = tmp_path / "palette.png"
    image = Image.new("P", (5, 3), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.save(palette)
    assert ImageRef(path=gray).load().getpixel((4, 2)) == (77, 77, 77)
    assert ImageRef(path=palette).load().getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(DataError, match=r"image is 5x3 but its annotation says 3x5 \(WxH\)"):
        ImageRef(path=gray, size=(3, 5)).load()


def test_masks_without_image_are_refused() -> None:
    sample = Sample("n", Task.REFERRING_SEGMENTATION, "test", masks=(MaskRef(RECT, 6, 8),))
    with pytest.raises(DataError, match=r"<input> \[sample n\]: sample has masks, depth or points but no image"):
        check_samples([sample], progress=False)


def test_skip_bad_needs_report(good) -> None:
    with pytest.raises(ValueError, match="skip_bad=True needs a BadItemReport"):
        check_samples([], skip_bad=True)


# ------------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize(("text", "letter"), [("(A)", "A"), ("B", "B"), (" c. ", "C"), ("(D)", "D")])
def test_parse_letter(text: str, letter: str) -> None:
    assert parse_letter(text, ("A", "B", "C", "D"), path="f") == letter


@pytest.mark.parametrize("text", ["(E)", "AB", "", None, "Point A"])
def test_parse_letter_rejects(text: object) -> None:
    with pytest.raises(DataError, match=r"f:3: answer .* is not one of the letters A/B/C/D"):
        parse_letter(text, ("A", "B", "C", "D"), path="f", line=3)


def test_to_int() -> None:
    assert [to_int(v, what="index", path="f") for v in (7, "7", " 1000007 ", "12.0", 3.0)] == [7, 7, 1000007, 12, 3]
    for bad in ("7.5", "x", True, None, 2.5):
        with pytest.raises(DataError, match=r"f \[row\]: index is .*, not an integer"):
            to_int(bad, what="index", path="f", item="row")


def test_iter_jsonl_non_utf8_line(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n{"c": 3}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: line is not UTF-8"):
        list(iter_jsonl(path, skip_bad=False, report=None))
    report = BadItemReport()
    assert [line for line, _ in iter_jsonl(path, skip_bad=True, report=report)] == [1, 3]
    assert [item.location for item in report.items] == [f"{path}:2"]
