"""LLaVA / InternVL conversation data: a JSON list, or JSONL with one record per line.

Record: ``{"id": ..., "image": "a.jpg" | ["a.jpg", ...] (absent for text-only),
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``.
Roles ``human``/``user`` become ``"user"`` and ``gpt``/``assistant`` become ``"assistant"``; a ``system``
message goes to ``meta["system"]``. The ``<image>`` placeholders stay in the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers._common import build_samples, check_skip_args, iter_jsonl, read_json
from perceptio.data.schema import ImageRef, Sample, Task, Turn

__all__ = ["IMAGE_PLACEHOLDER", "read_conversations"]

#: The token LLaVA and InternVL data put where an image goes.
IMAGE_PLACEHOLDER = "<image>"
_ROLES: dict[str, Literal["user", "assistant"]] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
_RECORD_FIELDS = {"id", "image", "conversations", "task"}


def _records(path: Path, *, skip_bad: bool, report: BadItemReport | None) -> Iterator[tuple[int | None, int, Any]]:
    """Yield ``(line or None, position, record)``: JSONL records carry their line, JSON list items do not."""
    if path.suffix == ".jsonl":
        for position, (line, record) in enumerate(iter_jsonl(path, skip_bad=skip_bad, report=report)):
            yield line, position, record
        return
    payload = read_json(path, what="conversation JSON", fix="pass a LLaVA/InternVL .json or .jsonl file")
    if not isinstance(payload, list):
        raise DataError(
            f"top level is a JSON {type(payload).__name__}, expected a list of records",
            path=path,
            fix="a conversation JSON is a list of {id, image, conversations} objects; JSONL needs a .jsonl suffix",
        )
    for position, record in enumerate(payload):
        yield None, position, record


def _image_names(value: Any, **where: Any) -> list[str]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise DataError(f"'image' is {value!r}", fix="'image' must be a file name or a list of file names", **where)
    return names


def _turns(value: Any, **where: Any) -> tuple[list[Turn], list[str]]:
    """Map the raw messages to user/assistant turns, and collect system messages apart."""
    if not isinstance(value, list) or not value:
        raise DataError("'conversations' is missing or empty", fix="give at least one human and one gpt turn", **where)
    turns: list[Turn] = []
    system: list[str] = []
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise DataError(f"turn {number} has no 'value' text", fix="each turn is {from, value}", **where)
        role = message.get("from", message.get("role"))
        if role == "system":
            system.append(message["value"])
            continue
        if role not in _ROLES:
            raise DataError(
                f"turn {number} has unknown role {role!r}", fix=f"use one of {sorted([*_ROLES, 'system'])}", **where
            )
        turns.append(Turn(role=_ROLES[role], text=message["value"]))
    return turns, system


def read_conversations(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    source: str | None = None,
    split: str | None = None,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> list[Sample]:
    """Read LLaVA/InternVL conversation records (``.json`` list or ``.jsonl``).

    Args:
        path: the annotation file; ``.jsonl`` is read line by line, anything else as one JSON list.
        image_root: the folder image names are relative to (default: the annotation file's folder).
        source: ``Sample.source`` (default: the file's stem).
        split: stored in ``Sample.split``.
        skip_bad: record bad records in ``report`` and skip them instead of raising.
        report: where skipped records are recorded.

    Returns:
        One sample per record: ``conversation`` holds every user/assistant turn, ``query`` the first user
        turn, ``answer`` the first assistant turn (None if there is none). ``task`` is ``Task.VQA`` unless the
        record has a ``task`` field naming another Task. Unknown record fields go to ``meta``.
    """
    check_skip_args(skip_bad, report)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    source = source or path.stem

    def build(entry: tuple[int | None, int, Any]) -> Sample:
        line, position, record = entry
        where: dict[str, Any] = {"path": path, "line": line, "item": f"record {position}"}
        if not isinstance(record, dict):
            raise DataError(f"record is a {type(record).__name__}", fix="each record is a JSON object", **where)
        if record.get("id") is not None:
            where["item"] = f"id {record['id']}"
        images = _image_names(record.get("image"), **where)
        turns, system = _turns(record.get("conversations"), **where)
        placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
        if placeholders > len(images):
            raise DataError(
                f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)",
                fix=f"list one image per {IMAGE_PLACEHOLDER}, or drop the extra placeholders",
                **where,
            )
        user = [turn.text for turn in turns if turn.role == "user"]
        if not user:
            raise DataError("conversation has no user turn", fix="start with a human/user turn", **where)
        assistant = [turn.text for turn in turns if turn.role == "assistant"]
        task = Task.VQA
        if record.get("task") is not None:
            try:
                task = Task(record["task"])
            except ValueError:
                raise DataError(
                    f"unknown task {record['task']!r}", fix=f"use one of {[t.value for t in Task]}", **where
                ) from None
        meta = {name: value for name, value in record.items() if name not in _RECORD_FIELDS}
        meta["id"] = record.get("id")
        if system:
            meta["system"] = "\n".join(system)
        return Sample(
            sample_id=str(record["id"]) if record.get("id") is not None else f"{path.stem}-{position}",
            task=task,
            source=source,
            split=split,
            images=tuple(ImageRef(path=root / name) for name in images),
            query=user[0],
            answer=assistant[0] if assistant else None,
            conversation=tuple(turns),
            meta=meta,
        )

    return build_samples(_records(path, skip_bad=skip_bad, report=report), build, skip_bad=skip_bad, report=report)
