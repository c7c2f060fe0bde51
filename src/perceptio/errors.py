"""The base of every expected failure: bad data, a wrong recipe, a damaged or mismatched checkpoint, a run folder
in use, a non-finite loss. Each message names the file, key or item and the fix; the command line prints it on one
line and exits with status 2. Anything else is a bug and keeps its traceback. Imports nothing of the package."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "UserError"]


class UserError(Exception):
    """An expected failure the user can fix; ``str(err)`` says what and how. Subclasses keep their usual base too
    (``DataError`` is a ``ValueError``), so existing ``except ValueError`` code still catches them."""


class NonFiniteLossError(UserError, FloatingPointError):
    """A trainer met a NaN or infinite loss (or gradient norm) and stopped before the weights took it; the message
    names the last good checkpoint and how to continue from it."""
