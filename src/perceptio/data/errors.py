"""Errors and the bad-item report shared by every reader.

Every reader raises :class:`DataError` for bad input. The message always names the file, and the line or item
id where there is one, and says what to change. Readers that take ``skip_bad=True`` record the problem in a
:class:`BadItemReport` instead of raising, so that nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from perceptio.errors import UserError

__all__ = ["BadItem", "BadItemReport", "DataError"]


class DataError(UserError, ValueError):
    """Bad input data. ``str(err)`` names the location (file, line, item) and the fix."""

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        item: str | int | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.line = line
        self.item = item
        self.fix = fix
        super().__init__(self._format())

    @property
    def location(self) -> str:
        where = self.path or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        if self.item is not None:
            where += f" [{self.item}]"
        return where

    def _format(self) -> str:
        message = f"{self.location}: {self.problem}"
        if self.fix:
            message += f". Fix: {self.fix}"
        return message


@dataclass(frozen=True)
class BadItem:
    """One skipped item: where it was and why."""

    location: str
    problem: str
    fix: str | None = None


@dataclass
class BadItemReport:
    """Collects the items a reader skipped under ``skip_bad=True``."""

    items: list[BadItem] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.items.append(BadItem(location=error.location, problem=error.problem, fix=error.fix))

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:  # an empty report is still a report, not "nothing"
        return True

    def write(self, path: str | Path) -> None:
        """Write the report as JSON: ``{"num_skipped": N, "items": [{location, problem, fix}, ...]}``."""
        payload = {"num_skipped": len(self.items), "items": [asdict(item) for item in self.items]}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def handle(error: DataError, *, skip_bad: bool, report: BadItemReport | None) -> None:
    """Raise ``error``, or record it when skipping bad items is on."""
    if not skip_bad:
        raise error
    if report is None:
        raise ValueError("skip_bad=True needs a BadItemReport to record skipped items in") from error
    report.add(error)
