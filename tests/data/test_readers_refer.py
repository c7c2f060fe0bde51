"""read_refer, the safe refs unpickler, image-root resolution and the RefCOCO leakage guard."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import READERS, assert_no_eval_images, eval_image_ids, load_refs, read_refer
from perceptio.data.schema import Sample, Task

IMG1 = "COCO_train2014_000000000001.jpg"  # 20 x 10 (W x H)
IMG2 = "COCO_train2014_000000000002.jpg"  # 16 x 12
RAW_PLACEHOLDER = "RAWPLACEHOLDER"

# Rectangles as COCO polygons: pycocotools fills [x0, x1) x [y0, y1), so a rectangle covers (x1-x0)*(y1-y0) px.
RECT_A = [2, 1, 8, 1, 8, 5, 2, 5]  # 6 x 4 = 24 px
RECT_B = [6, 3, 12, 3, 12, 8, 6, 8]  # 6 x 5 = 30 px, overlapping RECT_A on x 6..7, y 3..4 (4 px)


def _rle_str() -> str:
    from pycocotools import mask as mask_utils

    block = np.zeros((12, 16), dtype=np.uint8, order="F")
    block[2:5, 3:7] = 1  # 3 x 4 = 12 px
    return mask_utils.encode(block)["counts"].decode("ascii")


def _instances() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": IMG1, "height": 10, "width": 20},
            {"id": 2, "file_name": IMG2, "height": 12, "width": 16},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [RECT_A], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [RECT_A, RECT_B], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 1, "segmentation": {"size": [12, 16], "counts": _rle_str()}},
            # uncompressed RLE, column-major: 5 off, 7 on, rest off
            {"id": 13, "image_id": 2, "category_id": 2, "segmentation": {"size": [12, 16], "counts": [5, 7, 180]}},
            {"id": 14, "image_id": 2, "category_id": 2, "segmentation": []},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }


def _sentence(sent_id: int, text: str, raw: str | None = None) -> dict:
    return {"sent_id": sent_id, "sent": text, "raw": raw or text.title(), "tokens": text.split()}


def _ref(ref_id: int, ann_id: int | list[int], image_id: int, category_id: int, split: str, *sentences: dict) -> dict:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "split": split,
        "sentences": list(sentences),
        "sent_ids": [sentence["sent_id"] for sentence in sentences],
    }


def _refs() -> list[dict]:
    return [
        _ref(1, 10, 1, 1, "train", _sentence(100, "man left"), _sentence(101, "guy on left")),
        _ref(2, 11, 1, 2, "val", _sentence(200, "dog", raw=RAW_PLACEHOLDER)),
        _ref(3, 12, 2, 1, "testA", _sentence(300, "a"), _sentence(301, "b"), _sentence(302, "c")),
        _ref(4, 13, 2, 2, "testB", _sentence(400, "brown dog")),
        _ref(5, [-1], 2, 2, "testB", _sentence(500, "the cat")),  # gRefCOCO no-target
        _ref(6, [12, 13], 2, 1, "val", _sentence(600, "both")),  # gRefCOCO multi-object
        _ref(7, 14, 2, 2, "val", _sentence(700, "nothing drawn")),  # empty segmentation
    ]


def _py2_pickle(refs: list[dict]) -> bytes:
    """Pickle like Python 2 did: the placeholder becomes a byte string (SHORT_BINSTRING) holding latin-1 'café'."""
    data = pickle.dumps(refs, protocol=2)
    encoded = RAW_PLACEHOLDER.encode()
    py3_str = b"X" + struct.pack("<I", len(encoded)) + encoded
    assert data.count(py3_str) == 1
    return data.replace(py3_str, b"U" + bytes([4]) + "café".encode("latin1"))


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 10), (200, 30, 30)).save(folder / IMG1)
    Image.new("RGB", (16, 12), (30, 200, 30)).save(folder / IMG2)


@pytest.fixture()
def refer_root(tmp_path: Path) -> Path:
    root = tmp_path / "refer_seg"
    for name, refs_file in (("refcoco", "refs(unc).p"), ("refcocog", "refs(umd).p")):
        (root / name).mkdir(parents=True)
        (root / name / "instances.json").write_text(json.dumps(_instances()))
        (root / name / refs_file).write_bytes(_py2_pickle(_refs()))
    _write_images(root / "images" / "mscoco" / "images" / "train2014")  # the LISA layout
    return root


def test_val_split_one_sample_per_sentence(refer_root: Path) -> None:
    samples = read_refer(refer_root, "refcoco", split="val")
    assert [s.sample_id for s in samples] == ["2_200", "6_600", "7_700"]
    first = samples[0]
    assert first.task is Task.REFERRING_SEGMENTATION and first.source == "refcoco" and first.split == "val"
    assert first.query == "dog"
    assert first.meta["raw"] == "café"  # Python-2 byte string, decoded with the latin1 fallback
    assert first.meta | {"raw": None} == {
        "image_id": 1,
        "ann_id": 11,
        "ref_id": 2,
        "sent_id": 200,
        "category_id": 2,
        "category": "dog",
        "raw": None,
        "split_by": "unc",
        "ref_split": "val",
    }
    image_dir = refer_root / "images" / "mscoco" / "images" / "train2014"
    assert first.image.path == image_dir / IMG1 and first.image.size == (20, 10)
    assert first.image.load().size == (20, 10)


def test_masks_polygons_rle_and_union(refer_root: Path) -> None:
    by_id = {s.sample_id: s for s in read_refer(refer_root, "refcoco", split="val")}
    overlapping = by_id["2_200"].target_mask()
    assert overlapping.shape == (10, 20)
    assert overlapping.sum() == 24 + 30 - 4  # union of the two polygons
    assert by_id["2_200"].target_mask(lisa_compat=True).sum() == 24 + 30 - 2 * 4  # LISA drops the doubly covered px
    both = by_id["6_600"]  # gRefCOCO-style list: compressed-str RLE (12 px) + uncompressed RLE (7 px, disjoint)
    assert len(both.masks) == 2 and both.meta["ann_id"] == [12, 13]
    assert [int(m.decode().sum()) for m in both.masks] == [12, 7]
    assert both.target_mask().sum() == 19
    assert by_id["7_700"].target_mask().sum() == 0  # empty segmentation list


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train", ["1_100", "1_101"]),
        ("testA", ["3_300", "3_301", "3_302"]),
        ("testB", ["4_400", "5_500"]),
        ("test", ["3_300", "3_301", "3_302", "4_400", "5_500"]),
    ],
)
def test_split_selectors(refer_root: Path, split: str, expected: list[str]) -> None:
    assert [s.sample_id for s in read_refer(refer_root, "refcoco", split=split)] == expected


def test_no_target_ref_has_no_masks(refer_root: Path) -> None:
    cat = next(s for s in read_refer(refer_root, "refcoco", split="testB") if s.sample_id == "5_500")
    assert cat.masks == () and cat.meta["ann_id"] == [-1]
    assert cat.target_mask().shape == (12, 16) and not cat.target_mask().any()


def test_unknown_split_lists_available(refer_root: Path) -> None:
    with pytest.raises(
        DataError, match=r"unknown split 'testC'; this file's refs select \['test', 'testA', 'testB', 'train', 'val'\]"
    ):
        read_refer(refer_root, "refcoco", split="testC")
    assert read_refer(refer_root, "refcoco", split="test")  # listed, and accepted: every test split
    with pytest.raises(DataError, match=r"refs\(unc\)\.p.*unknown split 'validation'"):
        read_refer(refer_root, "refcoco", split="validation")


def test_default_split_by_and_aliases(refer_root: Path, tmp_path: Path) -> None:
    assert read_refer(refer_root, "refcocog", split="val")[0].meta["split_by"] == "umd"
    with pytest.raises(DataError, match=r"refer_seg/refcoco\+: refcoco\+ folder not found"):
        read_refer(refer_root, "refcoco_plus", split="val")  # the alias names the (missing) refcoco+ folder
    (refer_root / "refcoco+").mkdir()
    with pytest.raises(DataError, match=r"refcoco\+/instances\.json: instances\.json not found"):
        read_refer(refer_root, "refcoco_plus", split="val")
    (refer_root / "refcoco+" / "instances.json").write_text(json.dumps(_instances()))
    with pytest.raises(DataError, match=r"refcoco\+/refs\(unc\)\.p: refs pickle not found"):
        read_refer(refer_root, "refcoco_plus", split="val")
    with pytest.raises(DataError, match="unknown refer dataset 'refclef'"):
        read_refer(refer_root, "refclef")
    assert READERS["refcoco"] is read_refer


def test_missing_instances_names_the_file(refer_root: Path) -> None:
    (refer_root / "refcoco" / "instances.json").unlink()
    with pytest.raises(DataError, match=r"refcoco/instances\.json: instances\.json not found.*refer release"):
        read_refer(refer_root, "refcoco")


def test_image_root_resolution(refer_root: Path, tmp_path: Path) -> None:
    # Sa2VA evaluation layout: <parent>/glamm_data/images/coco2014/train2014 wins when LISA's folder is gone.
    lisa = refer_root / "images"
    sa2va = refer_root.parent / "glamm_data" / "images" / "coco2014" / "train2014"
    _write_images(sa2va)
    os.rename(lisa, tmp_path / "moved")
    assert read_refer(refer_root, split="val")[0].image.path == sa2va / IMG1
    explicit = tmp_path / "coco"
    _write_images(explicit)
    assert read_refer(refer_root, split="val", image_root=explicit)[0].image.path == explicit / IMG1
    os.rename(sa2va, tmp_path / "moved2")
    with pytest.raises(DataError, match=r"no COCO train2014 image folder found; tried .*mscoco/images/train2014, "):
        read_refer(refer_root, split="val")
    with pytest.raises(DataError, match="image root not found"):
        read_refer(refer_root, split="val", image_root=tmp_path / "nope")


def test_missing_image_file_surfaces_at_load(refer_root: Path) -> None:
    (refer_root / "images" / "mscoco" / "images" / "train2014" / IMG2).unlink()
    samples = read_refer(refer_root, split="testA")  # reading does not stat every image
    with pytest.raises(DataError, match=r"COCO_train2014_000000000002\.jpg: image file not found"):
        samples[0].image.load()


def test_bad_refs_raise_or_are_skipped(refer_root: Path) -> None:
    refs = _refs()
    refs[1]["ann_id"] = 999  # unknown ann
    refs[5]["image_id"] = 77  # unknown image
    del refs[6]["sentences"]
    (refer_root / "refcoco" / "refs(unc).p").write_bytes(_py2_pickle(refs))
    with pytest.raises(DataError, match=r"refs\(unc\)\.p \[ref 2\]: ann_id 999 is not in instances\.json"):
        read_refer(refer_root, split="val")
    report = BadItemReport()
    assert read_refer(refer_root, split="val", skip_bad=True, report=report) == []
    refs_path = refer_root / "refcoco" / "refs(unc).p"
    assert [item.location for item in report.items] == [f"{refs_path} [ref {i}]" for i in (2, 6, 7)]
    assert [item.problem for item in report.items] == [
        "ann_id 999 is not in instances.json",
        "image_id 77 is not in instances.json",
        "missing field(s) ['sentences']; "
        "the record has ['ann_id', 'category_id', 'image_id', 'ref_id', 'sent_ids', 'split']",
    ]


def test_skip_bad_without_report_fails_fast(refer_root: Path) -> None:
    with pytest.raises(ValueError, match="skip_bad=True needs a BadItemReport"):
        read_refer(refer_root, skip_bad=True)


# ------------------------------------------------------------------------------------------ pickle safety


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _RunsShell(marker)], protocol=2))
    with pytest.raises(
        DataError, match=r"refs\(unc\)\.p: refusing to load global '(posix|os)\.system': only plain data"
    ):
        load_refs(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _RunsShell(marker)], protocol=0))
    with pytest.raises(DataError, match="refusing to load global"):
        load_refs(path)
    assert not marker.exists()


def test_pickle_of_plain_class_instance_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(DataError, match=r"refusing to load global 'pathlib\.(_local\.)?PosixPath'"):
        load_refs(path)


def test_corrupt_and_wrong_shape_pickles(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(_refs())[:40])
    with pytest.raises(DataError, match="refs pickle cannot be read.*truncated or not a pickle"):
        load_refs(path)
    path.write_bytes(pickle.dumps({"refs": []}))
    with pytest.raises(DataError, match="holds a dict, expected a list of ref dicts"):
        load_refs(path)


# ---------------------------------------------------------------------------------------- leakage guard


def test_eval_image_ids_and_guard(refer_root: Path) -> None:
    # refcoco and refcocog: image 1 has val refs, image 2 testA/testB/val; refcoco+ does not exist (skipped).
    assert eval_image_ids(refer_root) == {1, 2}
    refs = _refs()
    for ref in refs:
        ref["image_id"], ref["split"] = (1, "train") if ref["ref_id"] <= 2 else (2, ref["split"])
    (refer_root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    assert eval_image_ids(refer_root, datasets=("refcoco",)) == {2}

    eval_ids = {2, 581857}
    assert_no_eval_images([1, "3", "coco/train2017/000000000004.jpg"], eval_ids, manifest="mix.yaml")
    assert_no_eval_images(["images/000000581857.jpg"], eval_ids, manifest="m")  # not a COCO path: not checked
    with pytest.raises(DataError) as err:
        assert_no_eval_images(
            [1, "COCO_train2014_000000581857.jpg", "llava/coco/train2017/000000000002.jpg", 2],
            eval_ids,
            manifest="mix.yaml",
        )
    assert str(err.value) == (
        "mix.yaml: training data contains 2 image(s) from RefCOCO/+/g evaluation splits, e.g. image_id [2, 581857]. "
        "Fix: drop these images from the training manifest (filter against eval_image_ids(root))"
    )
    train = read_refer(refer_root, "refcocog", split="train")  # samples carry meta image_id
    with pytest.raises(DataError, match=r"contains 1 image\(s\).*\[1\]"):
        assert_no_eval_images(train, {1}, manifest="refcocog train")
    no_meta = Sample("x", Task.VQA, "llava", images=(train[0].images[0],))  # id taken from COCO_train2014_... name
    with pytest.raises(DataError, match=r"\[1\]"):
        assert_no_eval_images([no_meta], {1}, manifest="llava")


def test_eval_image_ids_needs_a_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"none of the dataset folders \['refcoco', 'refcoco\+', 'refcocog'\] exists"):
        eval_image_ids(tmp_path)
