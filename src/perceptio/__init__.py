"""Perceptio: a vision-language model that writes segmentation and depth tokens before it answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

__all__ = ["Perceptio", "__version__"]

if TYPE_CHECKING:
    from perceptio.inference import Perceptio


def __getattr__(name: str) -> Any:  # torch and transformers load on first use, not on `import perceptio`
    if name == "Perceptio":
        from perceptio.inference import Perceptio

        return Perceptio
    raise AttributeError(f"module 'perceptio' has no attribute {name!r}")
