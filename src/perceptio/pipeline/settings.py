"""The limits of a settings dataclass, written once in its fields' metadata.

The applications' settings (``QuickstartConfig``, ``SpatialCotConfig``, ``PretrainConfig``) describe each field
with ``field(metadata={"help": ..., "min": ..., "max": ...})``: the command line builds its options from the same
metadata (``perceptio.cli._common.config_command``), and the dataclass checks the limits with
:func:`check_limits`, so the Python API refuses what the command line refuses.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from perceptio.config import ConfigError

__all__ = ["check_limits"]


def check_limits(settings: Any) -> None:
    """Raise ``ConfigError`` naming the field, its limit and its meaning when a field of the dataclass instance
    ``settings`` is below its ``min`` or above its ``max`` metadata (None values are not checked)."""
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        if value is None:
            continue
        low, high = spec.metadata.get("min"), spec.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f">= {low}" if low is not None and value < low else f"<= {high}"
            meaning = f" ({spec.metadata['help']})" if "help" in spec.metadata else ""
            raise ConfigError(f"{type(settings).__name__}.{spec.name} must be {bound}, got {value!r}{meaning}")
