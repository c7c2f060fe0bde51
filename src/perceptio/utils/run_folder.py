"""Run folders: what a folder's work was made with, and whether a job may continue it.

Every resumable job (training, depth-tokenizer training, evaluation, the pipeline's stages) records the settings
its work depends on, and continues a folder only when they are the same. This module owns the two halves of that:
:func:`settings_digest` (a short, stable fingerprint of JSON-able settings) and :func:`changed_settings` /
:func:`require_same_settings` (which settings differ, in words, so the refusal names them and the fix).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["changed_settings", "flatten_settings", "require_same_settings", "settings_digest"]


def settings_digest(*parts: Any) -> str:
    """A 16-hex-digit fingerprint of ``parts`` (JSON with sorted keys; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten_settings(payload: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"a.b.c": value}`` (a mapping with non-string keys is one value)."""
    flat: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    may_change: Iterable[str] = (),
    only_saved: bool = False,
) -> list[str]:
    """The settings (flattened to dotted keys) that differ between ``saved`` and ``current``, each as
    ``"key (saved X, now Y)"``. Keys equal to or under an entry of ``may_change`` are ignored; with
    ``only_saved``, so are keys the saved record does not have (settings added since it was written)."""
    allowed = tuple(may_change)
    old, new = flatten_settings(saved), flatten_settings(current)
    keys = sorted(set(old) if only_saved else set(old) | set(new))
    return [
        f"{key} (saved {old.get(key)!r}, now {new.get(key)!r})"
        for key in keys
        if old.get(key) != new.get(key) and not any(key == p or key.startswith(p + ".") for p in allowed)
    ]


def require_same_settings(
    folder: Path | str,
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    fix: str,
    may_change: Iterable[str] = (),
    only_saved: bool = False,
    shown: int = 6,
) -> None:
    """Raise ``ValueError`` naming ``folder``, the differing settings (at most ``shown``) and ``fix`` when the work
    saved in ``folder`` was made with other settings than ``current``."""
    differ = changed_settings(saved, current, may_change=may_change, only_saved=only_saved)
    if differ:
        more = f" and {len(differ) - shown} more" if len(differ) > shown else ""
        raise ValueError(f"{folder}: cannot resume with other settings: {'; '.join(differ[:shown])}{more}. {fix}")
