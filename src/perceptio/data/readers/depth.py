"""Depth maps: ``.npy`` / ``.npz`` arrays and 8- or 16-bit PNGs, decoded under an explicit convention.

A file's numbers mean nothing without their convention (:class:`~perceptio.data.schema.DepthConvention`):
NYU PNGs hold millimetres, KITTI PNGs metres x 256, Depth Anything PNGs relative inverse depth in 0..255.
PNG bit depth is checked against the convention, because reading an 8-bit map as millimetres (or the
reverse) gives plausible-looking garbage rather than an error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers._common import build_samples, check_skip_args, require_dir
from perceptio.data.schema import DEPTH_CONVENTIONS, DepthConvention, DepthMap, DepthRef, ImageRef, Sample, Task

__all__ = ["IMAGE_SUFFIXES", "DEPTH_SUFFIXES", "read_depth_folder", "read_depth_map"]

#: File suffixes read as depth maps.
DEPTH_SUFFIXES = (".npy", ".npz", ".png")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# A depth file next to its image is often named "<image stem>_depth" (Depth Anything outputs, ADE20K copies).
_DEPTH_STEM_SUFFIX = "_depth"


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


def _resolve_convention(convention: DepthConvention | str | None, depth_dir: Path) -> DepthConvention:
    if isinstance(convention, DepthConvention):
        return convention
    if isinstance(convention, str):
        if convention not in DEPTH_CONVENTIONS:
            raise ValueError(f"unknown depth convention {convention!r}; known: {sorted(DEPTH_CONVENTIONS)}")
        return DEPTH_CONVENTIONS[convention]
    sidecar = depth_dir / "depth.json"
    if not sidecar.is_file():
        raise DataError(
            "no depth convention given and no depth.json sidecar",
            path=depth_dir,
            fix=f"pass convention= (one of {sorted(DEPTH_CONVENTIONS)} or a DepthConvention) or write depth.json",
        )
    return DepthConvention.read_sidecar(sidecar)


def _image_for(depth_file: Path, image_dir: Path) -> Path | None:
    """The RGB image paired with a depth file: the same stem (or the stem without ``_depth``), not itself."""
    stems = [depth_file.stem]
    if depth_file.stem.endswith(_DEPTH_STEM_SUFFIX):
        stems.append(depth_file.stem[: -len(_DEPTH_STEM_SUFFIX)])
    for stem in stems:
        for suffix in IMAGE_SUFFIXES:
            candidate = image_dir / f"{stem}{suffix}"
            if candidate != depth_file and candidate.is_file():
                return candidate
    return None


def read_depth_folder(
    depth_dir: str | Path,
    *,
    image_dir: str | Path | None = None,
    convention: DepthConvention | str | None = None,
    key: str | None = None,
    split: str | None = None,
    require_images: bool = True,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> list[Sample]:
    """Pair every depth file in a folder with its RGB image.

    Args:
        depth_dir: the folder of ``*.npy`` / ``*.npz`` / ``*.png`` depth maps.
        image_dir: the folder of RGB images (``.png``/``.jpg``/``.jpeg``) with the same stem as their depth map
            (or the depth stem without a ``_depth`` suffix); default ``depth_dir``. When both are one folder, a
            PNG that is another file's image is an image, not a depth map.
        convention: a DepthConvention or a name in DEPTH_CONVENTIONS; default: ``depth_dir/depth.json``.
        key: the array name inside ``.npz`` files.
        split: stored in ``Sample.split``.
        require_images: a depth map without an image is an error (else the sample just has no image, which
            is enough for uses that only need depth, such as training the depth tokenizer on ground truth).
        skip_bad: record depth maps without an image in ``report`` and skip them instead of raising.
        report: where skipped files are recorded.

    Returns:
        One depth sample per depth map, sorted by file name, ``sample_id`` the depth file's stem. Maps are not
        decoded here; ``sample.depth.load()`` does that.
    """
    check_skip_args(skip_bad, report)
    depth_dir = require_dir(Path(depth_dir), what="depth folder", fix="pass the folder of depth maps")
    image_dir = require_dir(Path(image_dir or depth_dir), what="image folder", fix="pass the folder of RGB images")
    resolved = _resolve_convention(convention, depth_dir)
    candidates = sorted(p for p in depth_dir.iterdir() if p.is_file() and p.suffix.lower() in DEPTH_SUFFIXES)
    pairs = {candidate: _image_for(candidate, image_dir) for candidate in candidates}
    used_as_images = {image for image in pairs.values() if image is not None}
    depth_files = [candidate for candidate in candidates if candidate not in used_as_images]
    if not depth_files:
        raise DataError("no depth maps (*.npy, *.npz, *.png) found", path=depth_dir, fix="check the folder")

    seen: dict[str, Path] = {}

    def build(depth_file: Path) -> Sample:
        image = pairs[depth_file]
        if depth_file.stem in seen:
            raise DataError(
                f"two depth maps share the stem {depth_file.stem!r} ({seen[depth_file.stem].name})",
                path=depth_file,
                fix="keep one depth file per image",
            )
        seen[depth_file.stem] = depth_file
        if image is None and require_images:
            raise DataError(
                f"no RGB image {depth_file.stem}.png/.jpg/.jpeg for this depth map in {image_dir}",
                path=depth_file,
                fix="add the image, pass image_dir=, or remove the depth map",
            )
        return Sample(
            sample_id=depth_file.stem,
            task=Task.DEPTH,
            source="depth",
            split=split,
            images=(ImageRef(path=image),) if image is not None else (),
            depth=DepthRef(path=depth_file, convention=resolved, key=key),
            meta={"depth_file": depth_file.name, "image_file": image.name if image is not None else None},
        )

    return build_samples(depth_files, build, skip_bad=skip_bad, report=report)
