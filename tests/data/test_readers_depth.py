"""read_depth_map and read_depth_folder on hand-made NYU, KITTI, Depth Anything, .npy and .npz files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import READERS, check_samples, read_depth_folder, read_depth_map
from perceptio.data.schema import DEPTH_CONVENTIONS, DepthConvention, Task

NYU, KITTI, DA = DEPTH_CONVENTIONS["nyu"], DEPTH_CONVENTIONS["kitti"], DEPTH_CONVENTIONS["depth_anything_png"]
METRIC = DEPTH_CONVENTIONS["metric_m"]


def _png16(path: Path, raw: np.ndarray) -> Path:
    Image.fromarray(raw.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_nyu_png_millimetres_with_invalid_zeros(tmp_path: Path) -> None:
    raw = np.array([[0, 1000, 2500], [10000, 0, 65535]])
    depth = read_depth_map(_png16(tmp_path / "sync_depth_00001.png", raw), NYU)
    assert depth.values.dtype == np.float32 and depth.values.shape == (2, 3)
    np.testing.assert_allclose(depth.values[depth.valid], [1.0, 2.5, 10.0, 65.535], rtol=1e-6)
    assert depth.valid.tolist() == [[False, True, True], [True, False, True]]
    assert np.isnan(depth.values[~depth.valid]).all()
    assert depth.convention is NYU


def test_kitti_png_divides_by_256(tmp_path: Path) -> None:
    raw = np.array([[0, 256, 2560, 20480]])
    depth = read_depth_map(_png16(tmp_path / "0000000005.png", raw), KITTI)
    assert depth.values[0, 1:].tolist() == [1.0, 10.0, 80.0] and depth.valid.sum() == 3


def test_depth_anything_8bit_png(tmp_path: Path) -> None:
    path = tmp_path / "ADE_train_00000001_depth.png"
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8)).save(path)
    depth = read_depth_map(path, DA)
    np.testing.assert_allclose(depth.values, [[0.0, 0.2, 1.0]], rtol=1e-6)
    assert depth.valid.all()  # no invalid value in this convention: 0 is simply the farthest point


def test_png_bit_depth_must_fit_the_convention(tmp_path: Path) -> None:
    eight = tmp_path / "da.png"
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(eight)
    with pytest.raises(DataError) as err:
        read_depth_map(eight, NYU)
    assert str(err.value) == (
        f"{eight}: an 8-bit PNG (mode 'L') read with a convention of scale 0.001, which expects a 16-bit (mode I;16) "
        "PNG. Fix: use a convention that fits an 8-bit PNG, e.g. one of ['depth_anything_png']"
    )
    sixteen = _png16(tmp_path / "nyu.png", np.ones((2, 2)))
    with pytest.raises(
        DataError, match=r"a 16-bit PNG \(mode 'I;16'\).*one of \['nyu', 'kitti', 'metric_m', 'relative"
    ):
        read_depth_map(sixteen, DA)
    rgb = tmp_path / "colour.png"
    Image.new("RGB", (2, 2)).save(rgb)
    with pytest.raises(DataError, match=r"colour\.png: PNG has mode 'RGB'; a depth map is single-channel"):
        read_depth_map(rgb, NYU)


def test_npy_shapes(tmp_path: Path) -> None:
    values = np.array([[1.5, np.nan], [np.inf, 3.0]], dtype=np.float32)
    for name, array in {"hw": values, "chw": values[None], "hwc": values[..., None]}.items():
        np.save(tmp_path / f"{name}.npy", array)
        depth = read_depth_map(tmp_path / f"{name}.npy", METRIC)
        assert depth.values.shape == (2, 2) and depth.valid.tolist() == [[True, False], [False, True]]
        assert depth.values[depth.valid].tolist() == [1.5, 3.0]
    np.save(tmp_path / "two.npy", np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match=r"two\.npy: depth array has shape \(2, 4, 4\), expected \(H, W\)"):
        read_depth_map(tmp_path / "two.npy", METRIC)
    np.save(tmp_path / "ints.npy", np.array([[0, 3]], dtype=np.int32))
    millimetres = DepthConvention(scale=1e-3, invalid_value=0)
    assert read_depth_map(tmp_path / "ints.npy", millimetres).values[0, 1] == pytest.approx(0.003)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy: array file cannot be read"):
        read_depth_map(tmp_path / "obj.npy", METRIC)


def test_npz_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", depth=np.full((3, 2), 4.0))
    assert read_depth_map(tmp_path / "one.npz", METRIC).values.tolist() == [[4.0, 4.0]] * 3
    np.savez(tmp_path / "two.npz", depth=np.ones((2, 2)), conf=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"two\.npz: \.npz holds 2 arrays \['depth', 'conf'\]. Fix: pass key="):
        read_depth_map(tmp_path / "two.npz", METRIC)
    assert read_depth_map(tmp_path / "two.npz", METRIC, key="conf").values.sum() == 0
    with pytest.raises(DataError, match=r"\.npz has no array 'disp'; it has \['depth', 'conf'\]"):
        read_depth_map(tmp_path / "two.npz", METRIC, key="disp")


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.png: depth file not found"):
        read_depth_map(tmp_path / "gone.png", NYU)
    with pytest.raises(DataError, match=r"unsupported depth file type '\.exr'"):
        read_depth_map(tmp_path / "d.exr", NYU)
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(DataError, match=r"cut\.png: depth PNG cannot be decoded"):
        read_depth_map(tmp_path / "cut.png", NYU)


# ---------------------------------------------------------------------------------------------- folders


def _rgb(path: Path, size: tuple[int, int] = (3, 2)) -> None:
    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_folder_with_sidecar_and_same_folder_pairs(tmp_path: Path) -> None:
    (tmp_path / "depth.json").write_text(json.dumps({"convention": METRIC.to_dict()}))
    np.save(tmp_path / "a.npy", np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    _rgb(tmp_path / "a.png")  # same stem, same folder: the PNG is a's image, not a depth map
    _png16(tmp_path / "b_depth.png", np.array([[7, 7, 7], [7, 7, 9]]))  # Depth Anything-style name next to b.jpg
    _rgb(tmp_path / "b.jpg")
    samples = read_depth_folder(tmp_path, split="train")
    assert [(s.sample_id, s.image.path.name, s.depth.path.name) for s in samples] == [
        ("a", "a.png", "a.npy"),
        ("b_depth", "b.jpg", "b_depth.png"),
    ]
    first = samples[0]
    assert first.task is Task.DEPTH and first.source == "depth" and first.split == "train"
    assert first.depth.convention == METRIC and first.meta == {"depth_file": "a.npy", "image_file": "a.png"}
    assert samples[1].depth.load().values.tolist() == [[7.0] * 3, [7.0, 7.0, 9.0]]
    assert check_samples(samples, progress=False) == 2
    assert READERS["depth"] is read_depth_folder


def test_folder_convention_errors_and_separate_image_dir(tmp_path: Path) -> None:
    depth_dir, image_dir = tmp_path / "depth", tmp_path / "rgb"
    depth_dir.mkdir()
    image_dir.mkdir()
    _png16(depth_dir / "0001.png", np.full((2, 3), 1000))
    _rgb(image_dir / "0001.jpg")
    with pytest.raises(
        DataError, match=r"depth: no depth convention given and no depth.json sidecar. Fix: pass convention="
    ):
        read_depth_folder(depth_dir, image_dir=image_dir)
    (sample,) = read_depth_folder(depth_dir, image_dir=image_dir, convention="nyu")
    assert sample.depth.convention is NYU and sample.depth.load().values[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown depth convention 'nyu_mm'"):
        read_depth_folder(depth_dir, image_dir=image_dir, convention="nyu_mm")
    (depth_dir / "depth.json").write_text(json.dumps({"scale": 0.001, "units": "mm", "colour": "red"}))
    with pytest.raises(DataError, match=r"depth\.json: unknown depth-convention field\(s\) \['colour'\]"):
        read_depth_folder(depth_dir, image_dir=image_dir)


def test_missing_image_raises_or_is_skipped(tmp_path: Path) -> None:
    for stem in ("a", "b", "c"):
        np.save(tmp_path / f"{stem}.npy", np.ones((2, 3)))
    _rgb(tmp_path / "b.jpeg")
    with pytest.raises(DataError, match=r"a\.npy: no RGB image a\.png/\.jpg/\.jpeg for this depth map"):
        read_depth_folder(tmp_path, convention=METRIC)
    report = BadItemReport()
    samples = read_depth_folder(tmp_path, convention=METRIC, skip_bad=True, report=report)
    assert [s.sample_id for s in samples] == ["b"]
    assert [item.location for item in report.items] == [str(tmp_path / "a.npy"), str(tmp_path / "c.npy")]


def test_depth_size_must_match_image(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(1, 17, dtype=np.float64).reshape(4, 4))
    _rgb(tmp_path / "a.png", size=(3, 2))
    samples = read_depth_folder(tmp_path, convention=METRIC)
    with pytest.raises(DataError, match=r"a\.npy \[sample a\]: depth map is 4x4 but its image .*a\.png is 2x3 \(HxW\)"):
        check_samples(samples, progress=False)
