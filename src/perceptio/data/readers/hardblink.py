"""AURORA's HardBLINK relative-depth benchmark (and look-alikes written by our synthetic world).

Layout under ``root``::

    questions/blink_{N}pointscenter_questions[_long].jsonl   {"question_id", "image", "text", "category", ...}
    answers/blink_{N}pointscenter_answers.jsonl              {"question_id", "text": "(A)", ...}
    images/blink{N}pointscenter/{image}

Questions and answers are joined on ``question_id``, never on line order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from perceptio.data.errors import BadItemReport, DataError, handle
from perceptio.data.readers._common import (
    build_samples,
    check_skip_args,
    iter_jsonl,
    option_letters,
    parse_letter,
    require_dir,
    require_fields,
    require_file,
)
from perceptio.data.schema import ImageRef, Point, Sample, Task

__all__ = ["available_points", "read_hardblink"]

_QUESTIONS_RE = re.compile(r"blink_(\d+)pointscenter_questions(_long)?\.jsonl")
_QUESTION_FIELDS = {"question_id", "image", "text", "category", "points"}
_VARIANTS = {"": "", "long": "_long"}


def _suffix(variant: str) -> str:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be '' (direct questions) or 'long' (chain-of-thought), got {variant!r}")
    return _VARIANTS[variant]


def available_points(root: str | Path, *, variant: str = "") -> list[int]:
    """Return the marker counts N that have a question file for ``variant`` under ``root/questions``, sorted."""
    suffix = _suffix(variant)
    questions = require_dir(Path(root) / "questions", what="HardBLINK questions folder", fix="pass the HardBLINK root")
    found = []
    for path in questions.iterdir():
        match = _QUESTIONS_RE.fullmatch(path.name)
        if match and (match.group(2) or "") == suffix:
            found.append(int(match.group(1)))
    return sorted(found)


def _question_key(value: Any, *, path: Path, line: int) -> int | str:
    """question_id as an int (``3`` and ``"3"`` join) or, when not integer-like, as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if value.strip().isdigit() else value.strip()
    raise DataError(
        f"question_id is {value!r}", path=path, line=line, fix="question_id must be an integer or a non-empty string"
    )


def _index_by_id(
    path: Path, *, skip_bad: bool, report: BadItemReport | None
) -> dict[int | str, tuple[int, dict[str, Any]]]:
    """Map question_id -> (line, record) for a JSONL file; a repeated id is a bad item."""
    indexed: dict[int | str, tuple[int, dict[str, Any]]] = {}
    for line, record in iter_jsonl(path, skip_bad=skip_bad, report=report):
        try:
            require_fields(record, ["question_id"], path=path, line=line)
            key = _question_key(record["question_id"], path=path, line=line)
            if key in indexed:
                raise DataError(
                    f"duplicate question_id {key!r} (first on line {indexed[key][0]})",
                    path=path,
                    line=line,
                    fix="question ids must be unique within a file",
                )
        except DataError as err:
            handle(err, skip_bad=skip_bad, report=report)
            continue
        indexed[key] = (line, record)
    return indexed


def _points(raw: Any, letters: tuple[str, ...], *, path: Path, line: int) -> tuple[Point, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, dict) and {"label", "x", "y"} <= set(p) for p in raw):
        raise DataError(
            "'points' must be a list of {label, x, y} objects", path=path, line=line, fix="fix the synthetic writer"
        )
    try:
        points = tuple(Point(label=str(p["label"]), x=float(p["x"]), y=float(p["y"])) for p in raw)
    except (TypeError, ValueError) as err:
        raise DataError(
            f"a point coordinate is not a number ({err})", path=path, line=line, fix="write x, y as numbers"
        ) from None
    if sorted(point.label for point in points) != list(letters):
        raise DataError(
            f"point labels {[point.label for point in points]} are not the letters {list(letters)}",
            path=path,
            line=line,
            fix=f"an {len(letters)}-point question needs one point per letter {'/'.join(letters)}",
        )
    return points


def _read_subset(
    root: Path, num_points: int, suffix: str, split: str | None, *, skip_bad: bool, report: BadItemReport | None
) -> list[Sample]:
    subset = f"blink_{num_points}pointscenter"
    questions_path = root / "questions" / f"{subset}_questions{suffix}.jsonl"
    answers_path = require_file(
        root / "answers" / f"{subset}_answers.jsonl",
        what="HardBLINK answers file",
        fix=f"every questions file needs answers/{subset}_answers.jsonl",
    )
    image_dir = require_dir(
        root / "images" / f"blink{num_points}pointscenter", what="HardBLINK image folder", fix="check the root"
    )
    letters = option_letters(num_points)
    questions = _index_by_id(questions_path, skip_bad=skip_bad, report=report)
    answers = _index_by_id(answers_path, skip_bad=skip_bad, report=report)

    for key in answers.keys() - questions.keys():
        orphan = DataError(
            f"answer for question_id {key!r} has no question",
            path=answers_path,
            line=answers[key][0],
            fix=f"add the question to {questions_path.name} or delete the answer",
        )
        handle(orphan, skip_bad=skip_bad, report=report)

    def build(key: int | str) -> Sample:
        line, record = questions[key]
        if key not in answers:
            raise DataError(
                f"question_id {key!r} has no answer in {answers_path}",
                path=questions_path,
                line=line,
                fix="add its answer line, or delete the question",
            )
        answer_line, answer_record = answers[key]
        require_fields(record, ["image", "text"], path=questions_path, line=line)
        require_fields(answer_record, ["text"], path=answers_path, line=answer_line)
        answer = parse_letter(answer_record["text"], letters, path=answers_path, line=answer_line)
        points = _points(record["points"], letters, path=questions_path, line=line) if "points" in record else ()
        extras = {name: value for name, value in record.items() if name not in _QUESTION_FIELDS}
        return Sample(
            sample_id=f"{num_points}pt_{key}",
            task=Task.RELATIVE_DEPTH,
            source="hardblink",
            split=split,
            images=(ImageRef(path=image_dir / str(record["image"])),),
            query=str(record["text"]),
            answer=answer,
            points=points,
            meta={
                **extras,
                "num_points": num_points,
                "question_id": record["question_id"],
                "category": record.get("category"),
                "subset": subset,
                "variant": suffix.lstrip("_") or "direct",
            },
        )

    return build_samples(questions, build, skip_bad=skip_bad, report=report)


def read_hardblink(
    root: str | Path,
    *,
    points: Iterable[int] | None = None,
    variant: str = "",
    split: str | None = None,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> list[Sample]:
    """Read HardBLINK questions, joined with their gold letters on ``question_id``.

    Args:
        root: the folder holding ``questions/``, ``answers/`` and ``images/``.
        points: which marker counts N to read (e.g. ``(3, 4)``); None reads every N present.
        variant: ``""`` for the direct questions, ``"long"`` for the chain-of-thought ``*_long`` prompts.
        split: stored in ``Sample.split``; the layout itself has no splits.
        skip_bad: record bad items (malformed lines, duplicate ids, unmatched questions/answers, bad letters)
            in ``report`` and skip them instead of raising.
        report: where skipped items are recorded.

    Returns:
        Relative-depth samples ordered by N, then by question file order; ``answer`` is a single letter
        within the first N letters and ``meta["num_points"]`` is N.
    """
    check_skip_args(skip_bad, report)
    root = Path(root)
    suffix = _suffix(variant)
    present = available_points(root, variant=variant)
    if not present:
        raise DataError(
            f"no questions/blink_<N>pointscenter_questions{suffix}.jsonl files",
            path=root / "questions",
            fix="pass the HardBLINK root (the folder holding questions/, answers/ and images/)",
        )
    wanted = present if points is None else sorted(set(points))
    missing = [n for n in wanted if n not in present]
    if missing:
        raise DataError(
            f"no {missing}-point question file(s); present: {present}",
            path=root / "questions",
            fix=f"choose points from {present}",
        )
    samples: list[Sample] = []
    for num_points in wanted:
        samples.extend(_read_subset(root, num_points, suffix, split, skip_bad=skip_bad, report=report))
    return samples
