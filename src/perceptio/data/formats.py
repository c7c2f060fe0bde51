"""Conventions of the benchmark formats that readers, writers (the synthetic world) and metrics share: they live
here, below all three, so that none of them imports another's private module."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CIRCULAR_OFFSET", "MARKER_RULE", "MarkerRule", "option_letters"]

#: MMBench CircularEval: copy ``k`` of question ``g`` (its options rotated ``k`` times) has index ``g + k * 1e6``.
CIRCULAR_OFFSET = 1_000_000


def option_letters(count: int) -> tuple[str, ...]:
    """The first ``count`` option letters: ``option_letters(3) == ("A", "B", "C")``."""
    return tuple(chr(ord("A") + i) for i in range(count))


@dataclass(frozen=True)
class MarkerRule:
    """Where relative-depth markers may sit so that "which point is the closest" has one clear answer (the
    synthetic world's questions and the depth tokenizer's closest-point test sets follow the same rule).

    Attributes:
        band: markers sit in this band of image rows (fractions of the height): HardBLINK's mid-height rule.
        closest_gap: the second-closest marker is at least this much (relative) farther than the closest.
        min_gap: any two markers differ in depth by at least this much (relative).
        min_distance: any two markers are at least this fraction of the image width apart (labels must not
            collide).
    """

    band: tuple[float, float] = (0.35, 0.65)
    closest_gap: float = 0.15
    min_gap: float = 0.05
    min_distance: float = 0.1


MARKER_RULE = MarkerRule()
