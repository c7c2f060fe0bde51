"""The depth convention of the tokenizer (AURORA's) and the helpers that get maps into it and back.

Tokenizer maps are **relative inverse depth, min-max normalised per image to [0, 1], 1 = nearest**, resized
with nearest neighbour to the tokenizer's input size. Inside the network they are mapped to [-1, 1].

* metric depth (larger = farther) -> inverse depth 1/z -> min-max;
* inverse depth / disparity (larger = nearer, e.g. Depth Anything's relative output) -> min-max.

:func:`normalize_depth` returns the inverse-depth range it used (:class:`DepthStats`), so
:func:`denormalize_depth` can map a (decoded) normalised map back to the original quantity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from perceptio.data.schema import depth_values_problem
from perceptio.errors import UserError

__all__ = ["DepthInputError", "DepthStats", "denormalize_depth", "normalize_depth", "resize_nearest"]

Quantity = Literal["depth", "inverse_depth"]


class DepthInputError(UserError, ValueError):
    """A depth map the tokenizer cannot take (non-finite values, constant, wrong shape or dtype)."""


@dataclass(frozen=True)
class DepthStats:
    """The inverse-depth range of one map: normalised 0 is ``low``, normalised 1 is ``high``."""

    low: float
    high: float


def normalize_depth(
    values: np.ndarray, *, quantity: Quantity = "depth", valid: np.ndarray | None = None, name: str = "depth map"
) -> tuple[np.ndarray, DepthStats]:
    """Turn a depth or inverse-depth map (H, W) into the tokenizer convention: float32 in [0, 1], 1 = nearest.

    Args:
        values: the map.
        quantity: ``"depth"`` (larger = farther, must be > 0 where valid) or ``"inverse_depth"``.
        valid: bool (H, W) of pixels with a measurement; invalid pixels become 0 (the farthest value). Without
            it, every pixel must be finite.
        name: how errors name the map.

    Raises:
        DepthInputError: for a wrong shape or dtype, non-finite values outside ``valid``, non-positive depth, a
            map with no valid pixel, or a constant map (min-max normalisation is undefined for it).
    """
    if quantity not in ("depth", "inverse_depth"):
        raise ValueError(f"quantity must be 'depth' or 'inverse_depth', got {quantity!r}")
    if (problem := depth_values_problem(values, quantity=quantity, valid=valid)) is not None:
        raise DepthInputError(f"{name}: {problem}")
    arr = np.asarray(values).astype(np.float64)
    mask = np.isfinite(arr) if valid is None else np.asarray(valid, dtype=bool) & np.isfinite(arr)
    inverse = np.where(mask, 1.0 / np.where(mask, arr, 1.0), 0.0) if quantity == "depth" else np.where(mask, arr, 0.0)
    low, high = float(inverse[mask].min()), float(inverse[mask].max())
    normalized = np.where(mask, (inverse - low) / (high - low), 0.0)
    return normalized.astype(np.float32), DepthStats(low, high)


def denormalize_depth(normalized: np.ndarray, stats: DepthStats, *, quantity: Quantity = "depth") -> np.ndarray:
    """Map a normalised map back with the range of :func:`normalize_depth`: to depth (1 / inverse) or inverse depth.

    Depth is only defined where the inverse depth is positive; elsewhere (a relative map whose range starts at
    0) the result is ``inf``.
    """
    inverse = stats.low + np.asarray(normalized, dtype=np.float64) * (stats.high - stats.low)
    if quantity == "inverse_depth":
        return inverse.astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.where(inverse > 0, 1.0 / np.maximum(inverse, 1e-12), np.inf).astype(np.float32)


def resize_nearest(maps: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Resize (H, W) or (B, H, W) maps to (B, size, size) with nearest neighbour (pixel-centre aligned)."""
    tensor = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps, dtype=torch.float32)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.shape[-2:] == (size, size):
        return tensor
    return F.interpolate(tensor.unsqueeze(1), size=(size, size), mode="nearest-exact").squeeze(1)
