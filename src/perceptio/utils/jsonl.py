"""Reading the JSONL files that long jobs append to (logs, predictions), tolerant of a kill mid-line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl"]

logger = logging.getLogger(__name__)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of ``path`` (none if it does not exist). A line cut short by a kill is skipped with a
    warning: the job that wrote it redoes that piece of work."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d is incomplete (a kill mid-write?); it is skipped", path, number)
    return lines
