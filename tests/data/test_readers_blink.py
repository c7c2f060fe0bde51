"""read_blink on hand-made BLINK parquet files."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import READERS, check_samples, read_blink
from perceptio.data.schema import Task

PROMPT = "Which point is closer to the camera?\nSelect from the following choices.\n(A) A is closer\n(B) B is closer"
CHOICES = ["A is closer", "B is closer"]
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string())]
    + [(f"image_{k}", _IMAGE) for k in range(1, 5)]
    + [("choices", pa.list_(pa.string())), ("answer", pa.string()), ("prompt", pa.string())]
)


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(idx: str, answer: str, *images: dict | None, sub_task: str = "Relative_Depth") -> dict:
    padded = list(images) + [None] * (4 - len(images))
    return {
        "idx": idx,
        "question": "Which point is closer to the camera?",
        "sub_task": sub_task,
        **{f"image_{k}": image for k, image in enumerate(padded, start=1)},
        "choices": CHOICES,
        "answer": answer,
        "prompt": PROMPT,
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


@pytest.fixture()
def blink_root(tmp_path: Path) -> Path:
    root = tmp_path / "BLINK"
    val = [
        _row("val_Relative_Depth_1", "(A)", {"bytes": _png((30, 20), (255, 0, 0)), "path": "a.png"}, None),
        _row(
            "val_Relative_Depth_2",
            "(B)",
            {"bytes": _png((30, 20), (0, 255, 0)), "path": None},
            {"bytes": _png((10, 10), (0, 0, 255)), "path": None},
        ),
    ]
    _write(root / "Relative_Depth" / "val-00000-of-00001.parquet", val)
    # a test row whose image struct has only a path, relative to the parquet's folder
    Image.new("RGB", (8, 6), (9, 9, 9)).save(root / "Relative_Depth" / "t.png")
    test = [_row("test_Relative_Depth_1", "hidden", {"bytes": None, "path": "t.png"})]
    _write(root / "Relative_Depth" / "test-00000-of-00001.parquet", test)
    counting = [_row("val_Counting_1", "(B)", {"bytes": _png((5, 5), (1, 2, 3)), "path": None}, sub_task="Counting")]
    _write(root / "Counting" / "val-00000-of-00001.parquet", counting)
    return root


def test_val_rows(blink_root: Path) -> None:
    samples = read_blink(blink_root)
    assert [(s.sample_id, s.answer, len(s.images)) for s in samples] == [
        ("val_Relative_Depth_1", "A", 1),
        ("val_Relative_Depth_2", "B", 2),
    ]
    first = samples[0]
    assert first.task is Task.RELATIVE_DEPTH and first.source == "blink" and first.split == "val"
    assert first.choices == tuple(CHOICES) and first.query == "Which point is closer to the camera?"
    assert first.meta == {
        "idx": "val_Relative_Depth_1",
        "sub_task": "Relative_Depth",
        "prompt": PROMPT,
        "hidden": False,
    }
    assert first.images[0].name == "val-00000-of-00001.parquet[val_Relative_Depth_1] image_1"
    assert first.image.load().getpixel((0, 0)) == (255, 0, 0)
    assert [image.load().size for image in samples[1].images] == [(30, 20), (10, 10)]
    assert check_samples(samples, progress=False) == 2
    assert READERS["blink"] is read_blink


def test_hidden_test_answers_and_path_images(blink_root: Path) -> None:
    (sample,) = read_blink(blink_root, split="test")
    assert sample.answer is None and sample.meta["hidden"] is True and sample.split == "test"
    assert sample.image.path == blink_root / "Relative_Depth" / "t.png"
    assert sample.image.load().size == (8, 6)


def test_single_file_and_other_subtasks(blink_root: Path) -> None:
    (sample,) = read_blink(blink_root / "Relative_Depth" / "test-00000-of-00001.parquet")
    assert sample.split == "test"  # taken from the shard name
    (counting,) = read_blink(blink_root, subtask="Counting")
    assert counting.task is Task.MULTIPLE_CHOICE and counting.answer == "B"


def test_unknown_subtask_and_split(blink_root: Path) -> None:
    with pytest.raises(
        DataError, match=r"no subtask folder 'Depth'. Fix: choose subtask from \['Counting', 'Relative_Depth'\]"
    ):
        read_blink(blink_root, subtask="Depth")
    with pytest.raises(DataError, match=r"no train-\*\.parquet files. Fix: choose split from \['test', 'val'\]"):
        read_blink(blink_root, split="train")


def test_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "val-00000-of-00001.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="parquet file cannot be read"):
        read_blink(broken)
    table = pa.table({"idx": ["x"], "question": ["q"]})
    pq.write_table(table, broken)
    with pytest.raises(DataError, match=r"missing column\(s\) \['choices', 'answer'\]"):
        read_blink(broken)
    with pytest.raises(DataError, match="BLINK parquet file or root not found"):
        read_blink(tmp_path / "absent")


def test_bad_rows_raise_or_are_skipped(tmp_path: Path) -> None:
    image = {"bytes": _png((4, 4), (0, 0, 0)), "path": None}
    path = _write(
        tmp_path / "val-00000-of-00001.parquet",
        [
            _row("ok", "(A)", image),
            _row("bad_letter", "(C)", image),
            _row("no_image", "(B)"),
            _row("ok2", "(B)", image),
        ],
    )
    with pytest.raises(DataError, match=r"\[bad_letter\]: answer '\(C\)' is not one of the letters A/B"):
        read_blink(path)
    report = BadItemReport()
    assert [s.sample_id for s in read_blink(path, skip_bad=True, report=report)] == ["ok", "ok2"]
    assert [item.location for item in report.items] == [f"{path} [bad_letter]", f"{path} [no_image]"]
    assert report.items[1].problem == "row has no image"


def test_undecodable_image_bytes_fail_at_load(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "x.parquet", [_row("broken", "(A)", {"bytes": _png((4, 4), (0, 0, 0))[:30], "path": None})]
    )
    (sample,) = read_blink(path)
    with pytest.raises(DataError, match=r"x\.parquet\[broken\] image_1: image cannot be decoded"):
        sample.image.load()
