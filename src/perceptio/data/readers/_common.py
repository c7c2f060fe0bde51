"""Helpers shared by the readers: JSON/JSONL input with located errors, split checks, answer letters.

Readers raise :class:`~perceptio.data.errors.DataError` for bad input. Problems with a whole file (missing,
unreadable, wrong columns) always raise; problems with one item go through :func:`build_samples`, which
raises or, with ``skip_bad=True``, records the item in a :class:`~perceptio.data.errors.BadItemReport`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from perceptio.data.errors import BadItemReport, DataError, handle
from perceptio.data.formats import option_letters
from perceptio.data.schema import Sample

__all__ = [
    "build_samples",
    "check_skip_args",
    "iter_jsonl",
    "option_letters",
    "parse_letter",
    "read_json",
    "require_dir",
    "require_fields",
    "require_file",
    "select_split",
    "to_int",
]

T = TypeVar("T")

_LETTER_RE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\.?$")


def check_skip_args(skip_bad: bool, report: BadItemReport | None) -> None:
    """Fail before reading anything when ``skip_bad=True`` has nowhere to record skipped items."""
    if skip_bad and report is None:
        raise ValueError("skip_bad=True needs a BadItemReport (pass report=BadItemReport()) to record skipped items")


def build_samples(
    items: Iterable[T],
    build: Callable[[T], Sample | list[Sample] | None],
    *,
    skip_bad: bool,
    report: BadItemReport | None,
) -> list[Sample]:
    """Apply ``build`` to every item and return the samples it makes, in order.

    ``build`` returns one sample, a list of samples (one item may hold several, e.g. a ref with several
    sentences) or None, and raises DataError for a bad item, which is recorded and skipped under ``skip_bad``.
    """
    samples: list[Sample] = []
    for item in items:
        try:
            built = build(item)
        except DataError as err:
            handle(err, skip_bad=skip_bad, report=report)
            continue
        if isinstance(built, Sample):
            samples.append(built)
        elif built is not None:
            samples.extend(built)
    return samples


def require_file(path: Path, *, what: str, fix: str) -> Path:
    """Return ``path`` if it is a file; raise DataError saying which file was expected otherwise."""
    if not path.is_file():
        problem = f"{what} is not a file" if path.exists() else f"{what} not found"
        raise DataError(problem, path=path, fix=fix)
    return path


def require_dir(path: Path, *, what: str, fix: str) -> Path:
    """Return ``path`` if it is a directory; raise DataError otherwise."""
    if not path.is_dir():
        problem = f"{what} is not a directory" if path.exists() else f"{what} not found"
        raise DataError(problem, path=path, fix=fix)
    return path


def read_json(path: Path, *, what: str = "JSON file", fix: str = "check the path") -> Any:
    """Parse a whole JSON file. Raises DataError naming the file (and line) when missing or malformed."""
    require_file(path, what=what, fix=fix)
    try:
        with path.open(encoding="utf-8") as stream:
            return json.load(stream)
    except json.JSONDecodeError as err:
        raise DataError(
            f"malformed JSON ({err.msg}, column {err.colno})",
            path=path,
            line=err.lineno,
            fix="repair or re-download the file",
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason})", path=path, fix="re-encode the file as UTF-8") from None


def iter_jsonl(path: Path, *, skip_bad: bool, report: BadItemReport | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line of a JSONL file (line numbers start at 1).

    A line that is not valid JSON, or not a JSON object, raises DataError naming ``file:line`` (or is recorded
    and skipped under ``skip_bad``).
    """
    require_file(path, what="JSONL file", fix="check the path")
    with path.open("rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as err:
                error = DataError(
                    f"line is not UTF-8 ({err.reason})", path=path, line=line_no, fix="re-encode as UTF-8"
                )
                handle(error, skip_bad=skip_bad, report=report)
                continue
            except json.JSONDecodeError as err:
                error = DataError(
                    f"malformed JSON line ({err.msg}, column {err.colno})",
                    path=path,
                    line=line_no,
                    fix="each line must be one complete JSON object; repair or delete this line",
                )
                handle(error, skip_bad=skip_bad, report=report)
                continue
            if not isinstance(record, dict):
                error = DataError(
                    f"line holds a JSON {type(record).__name__}, expected an object",
                    path=path,
                    line=line_no,
                    fix="each line must be one JSON object",
                )
                handle(error, skip_bad=skip_bad, report=report)
                continue
            yield line_no, record


def require_fields(
    record: Mapping[str, Any],
    names: Sequence[str],
    *,
    path: Path | str,
    line: int | None = None,
    item: str | int | None = None,
) -> None:
    """Raise DataError naming the missing fields when ``record`` lacks any of ``names`` (or holds null)."""
    missing = [name for name in names if record.get(name) is None]
    if missing:
        raise DataError(
            f"missing field(s) {missing}; the record has {sorted(record)}",
            path=path,
            line=line,
            item=item,
            fix=f"every record needs {list(names)}",
        )


def to_int(value: Any, *, what: str, path: Path | str, line: int | None = None, item: str | int | None = None) -> int:
    """Read an integer that may be stored as int, integral float, or string (``"7"``, ``"7.0"``)."""
    if isinstance(value, bool):
        value = None  # True/False are never an id
    elif isinstance(value, int):
        return value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if re.fullmatch(r"[+-]?\d+\.0*", text):
            return int(float(text))
    raise DataError(
        f"{what} is {value!r}, not an integer", path=path, line=line, item=item, fix=f"write {what} as an integer"
    )


def parse_letter(
    text: Any,
    valid: Sequence[str],
    *,
    path: Path | str,
    line: int | None = None,
    item: str | int | None = None,
) -> str:
    """Turn a gold answer such as ``"(B)"``, ``"B"`` or ``"b."`` into ``"B"``, checking it is one of ``valid``."""
    match = _LETTER_RE.match(text.strip()) if isinstance(text, str) else None
    letter = match.group(1).upper() if match else None
    if letter is None or letter not in valid:
        raise DataError(
            f"answer {text!r} is not one of the letters {'/'.join(valid)}",
            path=path,
            line=line,
            item=item,
            fix=f"write the gold answer as a single letter, e.g. '({valid[0]})'",
        )
    return letter


def select_split(
    available: Iterable[str], split: str, *, path: Path | str, matches: Callable[[str], bool] | None = None
) -> Callable[[str], bool]:
    """Return a predicate for ``split`` over the split names ``available`` in a file.

    ``matches`` (default: exact equality) decides which stored splits a requested name selects. A name
    that selects nothing raises DataError listing the splits present.
    """
    present = sorted(set(available))
    predicate = matches or (lambda name: name == split)
    if not any(predicate(name) for name in present):
        raise DataError(
            f"unknown split {split!r}; the file has splits {present}",
            path=path,
            fix=f"pass one of {present}",
        )
    return predicate
