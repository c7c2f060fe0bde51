"""read_mmbench on hand-made TSVs in the VLMEvalKit and lmms-eval column variants."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import READERS, check_samples, read_mmbench
from perceptio.data.schema import Task

HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "l2-category",
    "split",
    "source",
    "comment",
    "image",
]
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _b64(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows() -> list[list[object]]:
    colours = ["red", "green", "blue", "white"]
    rows: list[list[object]] = []
    for k in range(4):  # one circular group: pass k shifts the options k times, and the answer with them
        shifted = colours[k:] + colours[:k]
        answer = "ABCD"[shifted.index("red")]
        image = _b64(RED) if k == 0 else "7"  # copies refer to the main row's image by index
        rows.append(
            [
                7 + k * 1_000_000,
                "What colour is it?",
                "Look closely",
                *shifted,
                answer,
                "colour",
                "perception",
                "dev",
                "synthetic",
                "",
                image,
            ]
        )
    rows.append(
        [
            12,
            "Is it blue?\nAnswer yes or no.",
            "nan",
            "yes",
            "no",
            "",
            "nan",
            "A",
            "colour",
            "perception",
            "dev",
            "synthetic",
            "two options",
            _b64(BLUE),
        ]
    )
    rows.append(
        [
            "13",
            "Which is left?",
            "",
            "first",
            "second",
            "third",
            "",
            "B",
            "spatial",
            "relation",
            "dev",
            "synthetic",
            "",
            json.dumps([_b64(GREEN), _b64(BLUE, (8, 8))]),
        ]
    )
    return rows


@pytest.fixture()
def tsv(tmp_path: Path) -> Path:
    return _write(tmp_path / "MMBench_DEV_EN.tsv", HEADER, _rows())


def test_rows_options_and_circular_meta(tsv: Path) -> None:
    samples = read_mmbench(tsv)
    assert [s.sample_id for s in samples] == ["7", "1000007", "2000007", "3000007", "12", "13"]
    assert [s.answer for s in samples] == ["A", "D", "C", "B", "A", "B"]
    assert [s.choices[ord(s.answer) - 65] for s in samples[:4]] == ["red"] * 4
    assert samples[1].choices == ("green", "blue", "white", "red")
    assert [(s.meta["g_index"], s.meta["circular_pass"]) for s in samples[:4]] == [(7, 0), (7, 1), (7, 2), (7, 3)]
    main = samples[0]
    assert main.task is Task.MULTIPLE_CHOICE and main.source == "mmbench" and main.split == "dev"
    assert main.meta == {
        "index": 7,
        "g_index": 7,
        "circular_pass": 0,
        "category": "colour",
        "l2_category": "perception",
        "split": "dev",
        "source": "synthetic",
        "hint": "Look closely",
        "comment": None,
    }
    assert READERS["mmbench"] is read_mmbench


def test_index_reference_resolves_to_the_main_image(tsv: Path) -> None:
    main, copy = read_mmbench(tsv)[:2]
    assert copy.image.data == main.image.data
    assert copy.image.name == f"{tsv.name}:3 [index 1000007]"
    assert copy.image.load().getpixel((3, 3)) == RED


def test_nan_hint_two_options_and_multiline_question(tsv: Path) -> None:
    two, listed = read_mmbench(tsv)[4:]
    assert two.meta["hint"] is None and two.choices == ("yes", "no") and two.letters == ("A", "B")
    assert two.query == "Is it blue?\nAnswer yes or no." and two.meta["comment"] == "two options"
    assert listed.meta["hint"] is None and listed.meta["index"] == 13  # "13" string index normalised to int
    assert listed.choices == ("first", "second", "third")
    assert [image.load().size for image in listed.images] == [(24, 16), (8, 8)]  # JSON list of base64 images
    assert listed.images[1].name == f"{tsv.name}:8 [index 13] image 2"  # the 2-line question shifts line numbers
    assert check_samples(read_mmbench(tsv), progress=False) == 6


def test_l2_header_variant_image_path_and_no_answer(tmp_path: Path) -> None:
    Image.new("RGB", (5, 7), GREEN).save(tmp_path / "q.png")
    header = ["index", "question", "hint", "A", "B", "category", "L2-category", "split", "image_path"]
    path = _write(tmp_path / "test.tsv", header, [["42.0", "Q?", "h", "x", "y", "c", "L2", "test", "q.png"]])
    (sample,) = read_mmbench(path)
    assert sample.answer is None and sample.meta["l2_category"] == "L2" and sample.meta["index"] == 42
    assert sample.image.path == tmp_path / "q.png" and sample.image.load().size == (5, 7)


def test_malformed_base64_names_line_and_index(tmp_path: Path) -> None:
    rows = _rows()
    rows[4][-1] = "not*base64" * 10
    path = _write(tmp_path / "bad.tsv", HEADER, rows)
    with pytest.raises(DataError, match=r"bad\.tsv:6 \[index 12\]: image is not valid base64"):
        read_mmbench(path)


def test_missing_question_column(tmp_path: Path) -> None:
    header = [c for c in HEADER if c != "question"]
    path = _write(tmp_path / "bad.tsv", header, [])
    with pytest.raises(DataError, match=r"bad\.tsv:1: missing column\(s\) \['question'\]"):
        read_mmbench(path)


def test_wrong_column_count_names_the_line(tmp_path: Path) -> None:
    rows = _rows()
    rows[5] = rows[5][:-2]
    path = _write(tmp_path / "bad.tsv", HEADER, rows)
    with pytest.raises(DataError, match=r"bad\.tsv:8: row has 12 cells but the header has 14"):
        read_mmbench(path)


def test_reference_to_missing_index_and_bad_index(tmp_path: Path) -> None:
    rows = _rows()
    del rows[0]  # the copies now refer to a row that is gone
    path = _write(tmp_path / "bad.tsv", HEADER, rows)
    with pytest.raises(DataError, match=r"bad\.tsv:2 \[index 1000007\]: image refers to index 7, which has no image"):
        read_mmbench(path)
    rows = _rows()
    rows[4][0] = "12a"
    path = _write(tmp_path / "bad2.tsv", HEADER, rows)
    with pytest.raises(DataError, match=r"bad2\.tsv:6: index is '12a', not an integer"):
        read_mmbench(path)


def test_skip_bad_records_each_row(tmp_path: Path) -> None:
    rows = _rows()
    rows[4][-1] = "%%%" * 30  # bad base64 (line 6)
    rows[5][5], rows[5][6] = "", "fourth"  # options A, B, D: a gap at C (line 8)
    rows.append([7, "dup", "", "a", "b", "", "", "A", "", "", "", "", "", _b64(RED)])  # duplicate index (line 9)
    path = _write(tmp_path / "bad.tsv", HEADER, rows)
    report = BadItemReport()
    samples = read_mmbench(path, skip_bad=True, report=report)
    assert [s.sample_id for s in samples] == ["7", "1000007", "2000007", "3000007"]
    assert [item.location for item in report.items] == [f"{path}:9", f"{path}:6 [index 12]", f"{path}:8 [index 13]"]
    assert report.items[0].problem == "duplicate index 7 (first on line 2)"
    assert report.items[2].problem.startswith("options must be consecutive letters from A")


def test_empty_and_undecodable_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.tsv: file is empty"):
        read_mmbench(empty)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("\t".join(HEADER).encode() + b"\n1\tcaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.tsv:2: line is not UTF-8 \(invalid continuation byte\)"):
        read_mmbench(latin)
    with pytest.raises(DataError, match=r"absent\.tsv: MMBench TSV not found"):
        read_mmbench(tmp_path / "absent.tsv")
