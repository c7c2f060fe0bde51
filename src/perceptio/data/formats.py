"""Conventions of the benchmark formats that readers, writers (the synthetic world) and metrics share: they live
here, below all three, so that none of them imports another's private module."""

from __future__ import annotations

__all__ = ["CIRCULAR_OFFSET", "option_letters"]

#: MMBench CircularEval: copy ``k`` of question ``g`` (its options rotated ``k`` times) has index ``g + k * 1e6``.
CIRCULAR_OFFSET = 1_000_000


def option_letters(count: int) -> tuple[str, ...]:
    """The first ``count`` option letters: ``option_letters(3) == ("A", "B", "C")``."""
    return tuple(chr(ord("A") + i) for i in range(count))
