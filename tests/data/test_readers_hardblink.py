"""read_hardblink on a hand-made tree and on the real benchmark in ../shared/benchmarks/hardblink."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import READERS, available_points, check_samples, read_hardblink
from perceptio.data.schema import Point, Task

QUESTION = "Which point is the closest to the camera?"
REAL_DIR = Path(os.environ.get("PERCEPTIO_HARDBLINK_DIR", Path(__file__).resolve().parents[2] / ".." / "shared"))
if "PERCEPTIO_HARDBLINK_DIR" not in os.environ:
    REAL_DIR = REAL_DIR / "benchmarks" / "hardblink"
needs_real = pytest.mark.skipif(
    not REAL_DIR.is_dir(), reason=f"HardBLINK not found at {REAL_DIR}; set PERCEPTIO_HARDBLINK_DIR to run this test"
)


def _write_jsonl(path: Path, records: list[dict | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _question(qid: int, **extra: object) -> dict:
    return {"question_id": qid, "image": f"{qid}.png", "text": QUESTION, "category": "count", **extra}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """2-point subset (synthetic-world style, with points) and 3-point subset (AURORA style), plus a _long file."""
    root = tmp_path / "hardblink"
    pts2 = [{"label": "B", "x": 12.0, "y": 40.5}, {"label": "A", "x": 30, "y": 41}]
    _write_jsonl(
        root / "questions" / "blink_2pointscenter_questions.jsonl",
        [_question(0, points=pts2, scene_id="s0"), _question(1, points=pts2, scene_id="s1")],
    )
    answers2 = [{"question_id": 0, "text": "(B)"}, {"question_id": 1, "text": "(A)"}]
    _write_jsonl(root / "answers" / "blink_2pointscenter_answers.jsonl", answers2)
    _write_jsonl(root / "questions" / "blink_3pointscenter_questions.jsonl", [_question(i) for i in range(3)])
    _write_jsonl(
        root / "questions" / "blink_3pointscenter_questions_long.jsonl", [_question(i, text="long?") for i in range(3)]
    )
    # answers in a different order from the questions: the join must use question_id
    _write_jsonl(
        root / "answers" / "blink_3pointscenter_answers.jsonl",
        [{"question_id": 2, "text": "(C)"}, {"question_id": "0", "text": "(A)"}, {"question_id": 1, "text": "B"}],
    )
    for n, count in ((2, 2), (3, 3)):
        folder = root / "images" / f"blink{n}pointscenter"
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (48, 64), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return root


def test_reads_every_subset_and_joins_on_id(tree: Path) -> None:
    samples = read_hardblink(tree, split="test")
    assert available_points(tree) == [2, 3] and available_points(tree, variant="long") == [3]
    assert [(s.sample_id, s.answer) for s in samples] == [
        ("2pt_0", "B"),
        ("2pt_1", "A"),
        ("3pt_0", "A"),
        ("3pt_1", "B"),
        ("3pt_2", "C"),
    ]
    two = samples[0]
    assert two.task is Task.RELATIVE_DEPTH and two.source == "hardblink" and two.split == "test"
    assert two.query == QUESTION
    assert two.points == (Point("B", 12.0, 40.5), Point("A", 30.0, 41.0))
    assert two.meta == {
        "scene_id": "s0",
        "num_points": 2,
        "question_id": 0,
        "category": "count",
        "subset": "blink_2pointscenter",
        "variant": "direct",
    }
    assert two.image.path == tree / "images" / "blink2pointscenter" / "0.png"
    assert samples[3].letters == ("A", "B", "C") and samples[3].points == ()
    assert check_samples(samples, progress=False) == 5
    assert READERS["hardblink"] is read_hardblink


def test_points_selection_and_variant(tree: Path) -> None:
    assert [s.sample_id for s in read_hardblink(tree, points=(3,))] == ["3pt_0", "3pt_1", "3pt_2"]
    long = read_hardblink(tree, variant="long")
    assert [(s.sample_id, s.query, s.meta["variant"]) for s in long][0] == ("3pt_0", "long?", "long")
    assert [s.answer for s in long] == ["A", "B", "C"]
    with pytest.raises(DataError, match=r"no \[4, 5\]-point question file\(s\); present: \[2, 3\]"):
        read_hardblink(tree, points=(3, 4, 5))
    with pytest.raises(ValueError, match="variant must be"):
        read_hardblink(tree, variant="cot")


def test_missing_folders(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(DataError, match="questions: HardBLINK questions folder not found"):
        read_hardblink(tmp_path / "nowhere")
    (tree / "answers" / "blink_2pointscenter_answers.jsonl").unlink()
    with pytest.raises(DataError, match=r"blink_2pointscenter_answers\.jsonl: HardBLINK answers file not found"):
        read_hardblink(tree)


def test_bad_items_raise(tree: Path) -> None:
    answers = tree / "answers" / "blink_3pointscenter_answers.jsonl"
    _write_jsonl(
        answers,
        [{"question_id": 0, "text": "(D)"}, {"question_id": 1, "text": "(B)"}, {"question_id": 2, "text": "(C)"}],
    )
    with pytest.raises(DataError, match=r"answers\.jsonl:1: answer '\(D\)' is not one of the letters A/B/C"):
        read_hardblink(tree, points=(3,))
    _write_jsonl(answers, [{"question_id": 0, "text": "(A)"}, '{"question_id": 1, "text": '])
    with pytest.raises(DataError, match=r"answers\.jsonl:2: malformed JSON line"):
        read_hardblink(tree, points=(3,))


def test_skip_bad_records_every_problem(tree: Path) -> None:
    questions = tree / "questions" / "blink_3pointscenter_questions.jsonl"
    answers = tree / "answers" / "blink_3pointscenter_answers.jsonl"
    _write_jsonl(questions, [_question(0), _question(1), _question(1), "{oops", _question(2), _question(3)])
    _write_jsonl(
        answers,
        [
            {"question_id": 0, "text": "(A)"},
            {"question_id": 1, "text": "(B)"},
            {"question_id": 2, "text": "(Q)"},
            {"question_id": 9, "text": "(A)"},
        ],
    )
    report = BadItemReport()
    samples = read_hardblink(tree, points=(3,), skip_bad=True, report=report)
    assert [s.sample_id for s in samples] == ["3pt_0", "3pt_1"]
    assert [(item.location, item.problem) for item in report.items] == [
        (f"{questions}:3", "duplicate question_id 1 (first on line 2)"),
        (f"{questions}:4", "malformed JSON line (Expecting property name enclosed in double quotes, column 2)"),
        (f"{answers}:4", "answer for question_id 9 has no question"),
        (f"{answers}:3", "answer '(Q)' is not one of the letters A/B/C"),
        (f"{questions}:6", f"question_id 3 has no answer in {answers}"),
    ]


def test_points_must_match_the_letters(tree: Path) -> None:
    bad = [{"label": "A", "x": 1, "y": 2}, {"label": "A", "x": 3, "y": 4}]
    _write_jsonl(tree / "questions" / "blink_2pointscenter_questions.jsonl", [_question(0, points=bad)])
    _write_jsonl(tree / "answers" / "blink_2pointscenter_answers.jsonl", [{"question_id": 0, "text": "(A)"}])
    with pytest.raises(
        DataError, match=r"questions\.jsonl:1: point labels \['A', 'A'\] are not the letters \['A', 'B'\]"
    ):
        read_hardblink(tree, points=(2,))


@needs_real
def test_real_benchmark_counts_and_gold_letters() -> None:
    samples = read_hardblink(REAL_DIR, split="test")
    assert len(samples) == 372
    assert Counter(s.meta["num_points"] for s in samples) == {3: 124, 4: 124, 5: 124}
    gold = {n: Counter(s.answer for s in samples if s.meta["num_points"] == n) for n in (3, 4, 5)}
    assert gold == {
        3: {"A": 41, "B": 47, "C": 36},
        4: {"A": 28, "B": 31, "C": 34, "D": 31},
        5: {"A": 23, "B": 27, "C": 20, "D": 27, "E": 27},
    }
    assert len({s.sample_id for s in samples}) == 372


@needs_real
def test_real_benchmark_images_are_336_rgb() -> None:
    samples = read_hardblink(REAL_DIR)
    sizes = Counter((image.mode, image.size) for image in (s.image.load() for s in samples))
    assert sizes == {("RGB", (336, 336)): 372}
