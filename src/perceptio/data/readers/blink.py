"""BLINK in the Hugging Face parquet layout (``BLINK-Benchmark/BLINK``): ``<root>/<subtask>/<split>-*.parquet``.

Rows hold ``idx, question, sub_task, image_1..image_4, choices, answer, prompt``. Image columns are HF
``Image`` structs ``{bytes, path}`` (null for unused slots). Test answers are ``"hidden"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers._common import build_samples, check_skip_args, option_letters, parse_letter, require_dir
from perceptio.data.schema import ImageRef, Sample, Task

__all__ = ["read_blink"]

_REQUIRED_COLUMNS = ("idx", "question", "choices", "answer")
_IMAGE_COLUMNS = ("image_1", "image_2", "image_3", "image_4")
_SHARD_RE = re.compile(r"(?P<split>[A-Za-z]+)-\d+-of-\d+\.parquet")


def _parquet_files(path: Path, subtask: str, split: str | None) -> tuple[list[Path], str | None]:
    """The parquet files to read and the split they hold."""
    if path.is_file():
        match = _SHARD_RE.fullmatch(path.name)
        return [path], split if split is not None else (match.group("split") if match else None)
    require_dir(path, what="BLINK parquet file or root", fix="pass a .parquet file or the BLINK root folder")
    split = split or "val"
    folder = path / subtask
    if not folder.is_dir():
        subtasks = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"no subtask folder {subtask!r}", path=path, fix=f"choose subtask from {subtasks}")
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if not files:
        splits = sorted({p.name.split("-")[0] for p in folder.glob("*.parquet")})
        raise DataError(f"no {split}-*.parquet files", path=folder, fix=f"choose split from {splits}")
    return files, split


def _image_refs(row: dict[str, Any], file: Path, item: str) -> tuple[ImageRef, ...]:
    refs = []
    for column in _IMAGE_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise DataError(
                f"{column} is a {type(value).__name__}, expected a {{bytes, path}} struct",
                path=file,
                item=item,
                fix="write images as HF Image features",
            )
        if value.get("bytes"):
            refs.append(ImageRef(data=value["bytes"], name=f"{file.name}[{item}] {column}"))
        elif value.get("path"):
            refs.append(ImageRef(path=file.parent / value["path"]))
    if not refs:
        raise DataError("row has no image", path=file, item=item, fix="fill image_1 with the question's image")
    return tuple(refs)


def read_blink(
    path: str | Path,
    *,
    subtask: str = "Relative_Depth",
    split: str | None = None,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> list[Sample]:
    """Read BLINK questions from one parquet file or from the BLINK root.

    Args:
        path: a ``.parquet`` file, or the root holding ``<subtask>/<split>-*.parquet``.
        subtask: the subtask folder to read under a root (ignored for a file).
        split: the split to read under a root (default ``"val"``); for a file, the split recorded in the
            samples (default: taken from a ``<split>-00000-of-00001.parquet`` file name).
        skip_bad: record bad rows in ``report`` and skip them instead of raising.
        report: where skipped rows are recorded.

    Returns:
        One sample per row: images from every non-null ``image_k``, ``choices`` in letter order, ``answer``
        the gold letter, or None with ``meta["hidden"] = True`` for hidden test answers. Relative_Depth rows
        get ``Task.RELATIVE_DEPTH``, all other subtasks ``Task.MULTIPLE_CHOICE``.
    """
    import pyarrow as pa  # lazy: only this reader needs pyarrow
    import pyarrow.parquet as pq

    check_skip_args(skip_bad, report)
    files, split = _parquet_files(Path(path), subtask, split)
    samples: list[Sample] = []
    for file in files:
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"parquet file cannot be read ({err})", path=file, fix="re-download the file") from None
        missing = [column for column in _REQUIRED_COLUMNS if column not in table.column_names]
        if missing:
            raise DataError(
                f"missing column(s) {missing}; the file has {table.column_names}",
                path=file,
                fix="use the BLINK parquet files from the HF hub",
            )

        def build(numbered: tuple[int, dict[str, Any]], file: Path = file) -> Sample:
            row_number, row = numbered
            item = str(row["idx"]) if row.get("idx") is not None else f"row {row_number}"
            choices = row.get("choices")
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise DataError(f"choices is {choices!r}", path=file, item=item, fix="choices must be a list of text")
            if not isinstance(row.get("question"), str):
                raise DataError("question is missing", path=file, item=item, fix="fill the question column")
            hidden = row.get("answer") == "hidden"
            answer = None
            if not hidden:
                answer = parse_letter(row.get("answer"), option_letters(len(choices)), path=file, item=item)
            sub_task = row.get("sub_task") or subtask
            return Sample(
                sample_id=item,
                task=Task.RELATIVE_DEPTH if sub_task == "Relative_Depth" else Task.MULTIPLE_CHOICE,
                source="blink",
                split=split,
                images=_image_refs(row, file, item),
                query=row["question"],
                answer=answer,
                choices=tuple(choices),
                meta={"idx": row.get("idx"), "sub_task": sub_task, "prompt": row.get("prompt"), "hidden": hidden},
            )

        samples.extend(build_samples(enumerate(table.to_pylist()), build, skip_bad=skip_bad, report=report))
    return samples
