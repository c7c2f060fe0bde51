"""Depth files and what their numbers mean: conventions, the decoded map, the value rules, and the decoder.

A file's numbers mean nothing without their convention (:class:`DepthConvention`): NYU PNGs hold millimetres,
KITTI PNGs metres x 256, Depth Anything PNGs relative inverse depth in 0..255. PNG bit depth is checked against the
convention, because reading an 8-bit map as millimetres (or the reverse) gives plausible-looking garbage rather
than an error. This module sits below :mod:`perceptio.data.schema` (whose ``DepthRef`` loads through it) and the
depth reader (which finds the files), so neither imports the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from perceptio.data.errors import DataError

__all__ = [
    "DEPTH_CONVENTIONS",
    "DEPTH_SUFFIXES",
    "DepthConvention",
    "DepthMap",
    "depth_values_problem",
    "read_depth_map",
]


@dataclass(frozen=True)
class DepthConvention:
    """What the numbers in a depth file mean.

    ``value = raw * scale`` gives the quantity in ``units``; raw values equal to ``invalid_value`` (and
    non-finite values) are invalid.

    Attributes:
        quantity: ``"depth"`` (distance along the optical axis, larger = farther) or ``"inverse_depth"``
            (disparity-like, larger = nearer; Depth Anything's relative output).
        metric: True when the values are in physical units; False for relative (per-image normalised) maps.
        units: ``"m"`` for metric depth, None for relative maps.
        scale: multiply raw file values by this to get ``units`` (NYU PNG: 0.001, KITTI PNG: 1/256).
        invalid_value: a raw value that marks missing measurements (0 for NYU and KITTI), or None.
    """

    quantity: Literal["depth", "inverse_depth"] = "depth"
    metric: bool = True
    units: str | None = "m"
    scale: float = 1.0
    invalid_value: float | None = None

    def __post_init__(self) -> None:
        if self.quantity not in ("depth", "inverse_depth"):
            raise ValueError(f"DepthConvention.quantity must be 'depth' or 'inverse_depth', got {self.quantity!r}")
        if self.metric and self.units is None:
            raise ValueError("a metric DepthConvention needs units (e.g. 'm')")
        if not self.scale > 0:
            raise ValueError(f"DepthConvention.scale must be positive, got {self.scale}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any], *, path: str | Path | None = None) -> DepthConvention:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known - {"format", "description"})
        if unknown:
            raise DataError(f"unknown depth-convention field(s) {unknown}", path=path, fix=f"use only {sorted(known)}")
        try:
            return cls(**{k: v for k, v in payload.items() if k in known})
        except (TypeError, ValueError) as err:
            raise DataError(
                f"invalid depth convention ({err})", path=path, fix="see perceptio.data.DepthConvention"
            ) from None

    @classmethod
    def read_sidecar(cls, path: str | Path) -> DepthConvention:
        """Read a ``depth.json`` sidecar that records the convention of a folder of depth maps."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError("depth sidecar not found", path=path, fix="write depth.json or pass a convention") from None
        except json.JSONDecodeError as err:
            raise DataError(
                f"malformed JSON ({err.msg} at line {err.lineno})", path=path, fix="repair the file"
            ) from None
        if not isinstance(payload, dict):
            raise DataError("depth sidecar must be a JSON object", path=path, fix="see docs/data.md")
        return cls.from_dict(payload.get("convention", payload), path=path)


#: Named conventions of common depth datasets.
DEPTH_CONVENTIONS: dict[str, DepthConvention] = {
    # NYU Depth v2 (BTS/GLPDepth "sync" layout): uint16 PNG in millimetres, 0 = no measurement.
    "nyu": DepthConvention(quantity="depth", metric=True, units="m", scale=1e-3, invalid_value=0),
    # KITTI depth: uint16 PNG, metres * 256, 0 = no LiDAR return.
    "kitti": DepthConvention(quantity="depth", metric=True, units="m", scale=1 / 256, invalid_value=0),
    # Depth Anything `--grayscale --pred-only` output: 8-bit relative inverse depth, min-max normalised per image.
    "depth_anything_png": DepthConvention(quantity="inverse_depth", metric=False, units=None, scale=1 / 255),
    # Float arrays of metric depth in metres (.npy / .npz), e.g. the synthetic world.
    "metric_m": DepthConvention(quantity="depth", metric=True, units="m", scale=1.0),
    # Float arrays of relative inverse depth (e.g. a Depth Anything teacher's raw output).
    "relative_inverse": DepthConvention(quantity="inverse_depth", metric=False, units=None, scale=1.0),
}


def depth_values_problem(values: np.ndarray, *, quantity: str = "depth", valid: np.ndarray | None = None) -> str | None:
    """Why a depth map cannot become a depth-span target (in words), or None when it can.

    The rules of the depth tokenizer's normalisation (which calls this): one numeric (H, W) array; without
    ``valid``, every value finite; at least one valid, finite pixel; depth (not inverse depth) positive where valid;
    not constant where valid (per-image min-max normalisation is undefined for a constant map).
    """
    arr = np.asarray(values)
    if arr.ndim != 2:
        return f"expected a single (H, W) map, got shape {arr.shape}"
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        return f"expected a numeric array, got dtype {arr.dtype}"
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if valid is None and not finite.all():
        return f"{int((~finite).sum())} NaN/inf value(s); pass valid= to mark missing measurements, or fill them first"
    mask = finite if valid is None else np.asarray(valid, dtype=bool) & finite
    if not mask.any():
        return "no valid pixel (every value is missing, NaN or infinite)"
    if quantity == "depth" and (arr[mask] <= 0).any():
        return f"depth must be positive where valid (found {arr[mask].min():.4g})"
    low, high = arr[mask].min(), arr[mask].max()
    if not high > low:
        return f"the map is constant ({high:.6g} everywhere); relative depth is undefined"
    return None


@dataclass(frozen=True)
class DepthMap:
    """A decoded depth map.

    Attributes:
        values: float32 (H, W) in the convention's units; invalid pixels hold NaN.
        valid: bool (H, W), False where the file marks no measurement.
        convention: what ``values`` mean.
    """

    values: np.ndarray
    valid: np.ndarray
    convention: DepthConvention


#: File suffixes read as depth maps.
DEPTH_SUFFIXES = (".npy", ".npz", ".png")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _is_eight_bit(convention: DepthConvention) -> bool:
    """Conventions that map 0..255 onto 0..1 describe 8-bit files."""
    return math.isclose(convention.scale, 1 / 255, rel_tol=1e-6)


def _fitting(eight_bit: bool) -> list[str]:
    return [name for name, c in DEPTH_CONVENTIONS.items() if _is_eight_bit(c) == eight_bit]


def _read_png(path: Path, convention: DepthConvention) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            raw = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"depth PNG cannot be decoded ({err})", path=path, fix="re-create the file") from None
    if mode not in _SIXTEEN_BIT_MODES | {"L"}:
        raise DataError(
            f"PNG has mode {mode!r}; a depth map is single-channel (8-bit L or 16-bit I;16)",
            path=path,
            fix="this looks like a colour image or a colourised visualisation; read the raw depth file instead",
        )
    eight_bit_file = mode == "L"
    if eight_bit_file != _is_eight_bit(convention):
        kind = "an 8-bit" if eight_bit_file else "a 16-bit"
        wanted = "an 8-bit (mode L)" if _is_eight_bit(convention) else "a 16-bit (mode I;16)"
        raise DataError(
            f"{kind} PNG (mode {mode!r}) read with a convention of scale {convention.scale:g}, "
            f"which expects {wanted} PNG",
            path=path,
            fix=f"use a convention that fits {kind} PNG, e.g. one of {_fitting(eight_bit_file)}",
        )
    return raw


def _read_array(path: Path, key: str | None) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"array file cannot be read ({err})", path=path, fix="re-create the file") from None
    if path.suffix != ".npz":
        return loaded
    with loaded:
        keys = list(loaded.files)
        if key is None and len(keys) != 1:
            raise DataError(
                f".npz holds {len(keys)} arrays {keys}", path=path, fix="pass key=<name> to say which is the depth map"
            )
        if key is not None and key not in keys:
            raise DataError(f".npz has no array {key!r}; it has {keys}", path=path, fix=f"use key from {keys}")
        try:
            return loaded[key if key is not None else keys[0]]
        except ValueError as err:  # an object array, refused because allow_pickle=False
            raise DataError(f"array cannot be read ({err})", path=path, fix="store a numeric array") from None


def _as_2d(raw: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze one leading or trailing singleton axis; anything else that is not (H, W) is refused."""
    if raw.ndim == 3 and raw.shape[0] == 1:
        raw = raw[0]
    elif raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise DataError(
            f"depth array has shape {raw.shape}, expected (H, W)",
            path=path,
            fix="store one single-channel map per file, shape (H, W), (1, H, W) or (H, W, 1)",
        )
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise DataError(f"depth array has dtype {raw.dtype}", path=path, fix="store an integer or float array")
    return raw


def read_depth_map(path: str | Path, convention: DepthConvention, *, key: str | None = None) -> DepthMap:
    """Decode one depth file into values in the convention's units.

    Args:
        path: a ``.npy``, ``.npz`` or ``.png`` file.
        convention: what the stored numbers mean; PNG bit depth must fit it (8-bit for scale 1/255,
            16-bit otherwise).
        key: the array name inside an ``.npz`` (None: it must hold exactly one array).

    Returns:
        A DepthMap with ``values`` float32 (H, W) = raw * scale, NaN where the raw value equals
        ``convention.invalid_value`` or is not finite, and ``valid`` bool (H, W) marking the other pixels.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DEPTH_SUFFIXES:
        raise DataError(f"unsupported depth file type {suffix!r}", path=path, fix=f"use one of {DEPTH_SUFFIXES}")
    if not path.is_file():
        raise DataError("depth file not found", path=path, fix="check the depth folder / path")
    raw = _read_png(path, convention) if suffix == ".png" else _read_array(path, key)
    raw = _as_2d(np.asarray(raw), path).astype(np.float64)
    invalid = ~np.isfinite(raw)
    if convention.invalid_value is not None:
        invalid |= raw == convention.invalid_value
    values = (raw * convention.scale).astype(np.float32)
    values[invalid] = np.nan
    return DepthMap(values=values, valid=~invalid, convention=convention)
