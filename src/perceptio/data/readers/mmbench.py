"""MMBench TSV files, in both the VLMEvalKit format and the legacy one.

Columns: ``index, question, hint, A, B, C, D`` (further capital letters possible; an absent option is NaN or
empty), ``answer`` (absent in test files), ``category``, ``l2-category`` (``L2-category`` in lmms-eval
copies), ``split``, ``source``, ``comment``, and ``image`` (base64) and/or ``image_path``.

VLMEvalKit files store each image once: a copy row holds, instead of base64, the ``index`` of the row whose
image it reuses (a string of 64 characters or fewer). CircularEval copies of a question have
``index = g_index + k * 1_000_000`` for pass k.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceptio.data.errors import BadItemReport, DataError, handle
from perceptio.data.formats import CIRCULAR_OFFSET
from perceptio.data.readers._common import (
    build_samples,
    check_skip_args,
    option_letters,
    parse_letter,
    require_file,
    to_int,
)
from perceptio.data.schema import ImageRef, Sample, Task

__all__ = ["CIRCULAR_OFFSET", "read_mmbench"]

# Strings at most this long in the image column are index references, not base64 (VLMEvalKit's rule).
_MAX_REFERENCE_CHARS = 64
_LETTER_COLUMN_RE = re.compile(r"[A-Z]")


@dataclass(frozen=True)
class _Row:
    line: int
    index: int
    values: dict[str, str]


def _absent(value: str | None) -> bool:
    """pandas writes a missing cell as empty or ``nan``."""
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def _b64(text: str, *, path: Path, line: int, index: int) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise DataError(
            f"image is not valid base64 ({err})",
            path=path,
            line=line,
            item=f"index {index}",
            fix="re-export the TSV; the image cell is truncated or corrupted",
        ) from None


def _split_list(text: str) -> list[str] | None:
    """A cell holding a JSON list of strings (several images), else None."""
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _images(row: _Row, path: Path, own_images: dict[int, str]) -> tuple[ImageRef, ...]:
    """Decode the row's ``image`` cell (base64, index reference or JSON list), else its ``image_path`` cell."""
    where = {"path": path, "line": row.line, "item": f"index {row.index}"}
    name = f"{path.name}:{row.line} [index {row.index}]"
    raw = row.values.get("image")
    if raw is not None and not _absent(raw):
        if len(raw.strip()) <= _MAX_REFERENCE_CHARS:
            target = to_int(raw, what="image reference", **where)
            if target not in own_images:
                raise DataError(
                    f"image refers to index {target}, which has no image of its own in this file",
                    fix="keep the referenced row in the file, or store the base64 image in this row",
                    **where,
                )
            raw = own_images[target]
        encoded = _split_list(raw) or [raw]
        names = [name] if len(encoded) == 1 else [f"{name} image {k}" for k in range(1, len(encoded) + 1)]
        return tuple(
            ImageRef(data=_b64(text, path=path, line=row.line, index=row.index), name=label)
            for text, label in zip(encoded, names, strict=True)
        )
    rel = row.values.get("image_path")
    if rel is not None and not _absent(rel):
        return tuple(ImageRef(path=path.parent / p) for p in (_split_list(rel) or [rel.strip()]))
    raise DataError("row has no image", fix="fill the image (base64) or image_path column", **where)


def _utf8_lines(path: Path, stream: Iterable[bytes]) -> Iterator[str]:
    """Decode line by line, so that a bad byte is reported on its own line rather than a buffer's."""
    for number, raw in enumerate(stream, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"line is not UTF-8 ({err.reason})", path=path, line=number, fix="re-export the file as UTF-8"
            ) from None


def _tsv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first line, cells)`` per record (a quoted cell may span lines); parse errors name the line."""
    try:
        csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's 128 KiB default
    except OverflowError:  # platforms whose C long is 32-bit
        csv.field_size_limit(2**31 - 1)
    with path.open("rb") as stream:
        reader = csv.reader(_utf8_lines(path, stream), delimiter="\t")
        end_line = 0
        try:
            for cells in reader:
                line, end_line = end_line + 1, reader.line_num
                if cells:
                    yield line, cells
        except csv.Error as err:
            raise DataError(
                f"TSV cannot be parsed ({err})", path=path, line=reader.line_num, fix="repair the file"
            ) from None


def _read_rows(path: Path, *, skip_bad: bool, report: BadItemReport | None) -> tuple[list[str], list[_Row]]:
    """Parse the TSV into its header and rows with integer indexes; bad rows raise or are recorded."""
    records = _tsv_records(path)
    _, header = next(records, (1, []))
    if not header:
        raise DataError("file is empty", path=path, fix="expected a header row: index, question, A, B, ...")
    missing = [c for c in ("index", "question") if c not in header]
    if not {"image", "image_path"} & set(header):
        missing.append("image")
    if missing:
        raise DataError(
            f"missing column(s) {missing}; the header has {header}",
            path=path,
            line=1,
            fix="use an MMBench TSV (VLMEvalKit or legacy format)",
        )
    rows: list[_Row] = []
    seen: dict[int, int] = {}
    for line, cells in records:
        try:
            if len(cells) != len(header):
                raise DataError(
                    f"row has {len(cells)} cells but the header has {len(header)}",
                    path=path,
                    line=line,
                    fix="check for unescaped tabs or quotes in this row",
                )
            values = dict(zip(header, cells, strict=True))
            index = to_int(values["index"], what="index", path=path, line=line)
            if index in seen:
                raise DataError(
                    f"duplicate index {index} (first on line {seen[index]})",
                    path=path,
                    line=line,
                    fix="indexes must be unique",
                )
        except DataError as err:
            handle(err, skip_bad=skip_bad, report=report)
            continue
        seen[index] = line
        rows.append(_Row(line, index, values))
    return header, rows


def read_mmbench(path: str | Path, *, skip_bad: bool = False, report: BadItemReport | None = None) -> list[Sample]:
    """Read an MMBench TSV (dev or test, any language, VLMEvalKit or legacy format).

    Args:
        path: the ``.tsv`` file.
        skip_bad: record bad rows in ``report`` and skip them instead of raising.
        report: where skipped rows are recorded.

    Returns:
        One multiple-choice sample per row, CircularEval copies included, in file order: ``choices`` are
        the non-empty option columns A, B, ... in letter order, ``answer`` the gold letter (None when the
        file has none), and ``meta`` holds ``index``, ``g_index``, ``circular_pass``, ``category``,
        ``l2_category``, ``split``, ``source``, ``hint`` and ``comment``.
    """
    check_skip_args(skip_bad, report)
    path = Path(path)
    require_file(path, what="MMBench TSV", fix="pass the path of an MMBench .tsv file")
    header, rows = _read_rows(path, skip_bad=skip_bad, report=report)
    letter_columns = sorted(c for c in header if _LETTER_COLUMN_RE.fullmatch(c))
    l2_column = "l2-category" if "l2-category" in header else "L2-category"
    own_images = {
        row.index: row.values["image"]
        for row in rows
        if not _absent(row.values.get("image")) and len(row.values["image"].strip()) > _MAX_REFERENCE_CHARS
    }

    def cell(row: _Row, column: str) -> str | None:
        value = row.values.get(column)
        return None if _absent(value) else value

    def build(row: _Row) -> Sample:
        where: dict[str, Any] = {"path": path, "line": row.line, "item": f"index {row.index}"}
        question = cell(row, "question")
        if question is None:
            raise DataError("question is empty", fix="fill the question cell", **where)
        choices: list[str] = []
        for letter in letter_columns:
            text = cell(row, letter)
            if text is None:
                break
            choices.append(text)
        extra = [c for c in letter_columns[len(choices) :] if cell(row, c) is not None]
        if len(choices) < 2 or letter_columns[: len(choices)] != list(option_letters(len(choices))) or extra:
            raise DataError(
                f"options must be consecutive letters from A, at least two; got {choices} (and stray {extra})",
                fix="fill option columns A, B, ... without gaps",
                **where,
            )
        answer = cell(row, "answer")
        if answer is not None:
            answer = parse_letter(answer, option_letters(len(choices)), **where)
        hint = cell(row, "hint")
        return Sample(
            sample_id=str(row.index),
            task=Task.MULTIPLE_CHOICE,
            source="mmbench",
            split=cell(row, "split"),
            images=_images(row, path, own_images),
            query=question,
            answer=answer,
            choices=tuple(choices),
            meta={
                "index": row.index,
                "g_index": row.index % CIRCULAR_OFFSET,
                "circular_pass": row.index // CIRCULAR_OFFSET,
                "category": cell(row, "category"),
                "l2_category": cell(row, l2_column),
                "split": cell(row, "split"),
                "source": cell(row, "source"),
                "hint": hint,
                "comment": cell(row, "comment"),
            },
        )

    return build_samples(rows, build, skip_bad=skip_bad, report=report)
