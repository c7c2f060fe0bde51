"""The one sample record that every dataset reader produces.

A :class:`Sample` holds references to its image, masks and depth map rather than decoded arrays, so that
reading a benchmark's annotations is cheap and decoding happens when a sample is used. Decoding validates:
an image that cannot be decoded, has an unexpected mode, or does not match the size its annotation claims
raises :class:`~perceptio.data.errors.DataError` naming the file and the fix.

Conventions:
    * images are RGB ``PIL.Image.Image`` after :meth:`ImageRef.load`;
    * masks decode to boolean arrays of shape (H, W) at the original image resolution;
    * depth maps decode to float32 arrays of shape (H, W) plus a boolean validity mask, in the units their
      :class:`DepthConvention` names;
    * points are pixel coordinates (x right, y down) in the original image.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from perceptio.data.depth_files import (  # re-exported: the depth types are part of the schema
    DEPTH_CONVENTIONS,
    DepthConvention,
    DepthMap,
    depth_values_problem,
    read_depth_map,
)
from perceptio.data.errors import DataError

__all__ = [
    "DEPTH_CONVENTIONS",
    "DepthConvention",
    "DepthMap",
    "DepthRef",
    "ImageRef",
    "MaskRef",
    "Point",
    "Sample",
    "Task",
    "Turn",
    "as_rgb",
    "depth_values_problem",
    "load_rgb",
]


class Task(enum.StrEnum):
    """What a sample asks for. The value is the name used in files and configs."""

    REFERRING_SEGMENTATION = "referring_segmentation"
    DEPTH = "depth"
    RELATIVE_DEPTH = "relative_depth"
    VQA = "vqa"
    MULTIPLE_CHOICE = "multiple_choice"


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class Point:
    """A labelled marker in pixel coordinates of the original image (x right, y down)."""

    label: str
    x: float
    y: float


# --------------------------------------------------------------------------------------------------- images

# Modes that convert to RGB without losing meaning. Alpha-carrying modes are accepted only when fully opaque
# (a transparent pixel has no defined colour), and single-channel 16/32-bit modes are refused: in practice
# they are depth maps handed to an image reader by mistake.
_RGB_CONVERTIBLE = {"RGB", "L", "P", "1", "CMYK", "YCbCr", "RGBA", "LA", "PA", "RGBa", "La"}


MAX_IMAGE_PIXELS = 40_000_000
"""Images with more pixels are refused before decoding (an 8000x8000 PNG of 200 KB would take about 8 GB of
memory); every model here works at a few hundred pixels, so downscale such images first."""


def load_rgb(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    expected_size: tuple[int, int] | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """Decode an image file or bytes into an RGB image, with errors that name the file.

    Args:
        source: a path, or the encoded bytes of an image.
        name: how to name the image in errors (defaults to the path).
        expected_size: ``(width, height)`` the annotation claims; a mismatch raises.
        max_side: return the image shrunk to fit in ``max_side`` x ``max_side`` (aspect kept). A JPEG is then
            decoded at a reduced scale (1/2 to 1/8) to begin with, which costs a fraction of the time and memory
            of a full decode and lets a JPEG over the pixel limit through when its reduced size is within it.

    Returns:
        The decoded image in mode RGB.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<image bytes>")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if max_side is not None and max(image.size) > max_side and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))  # the cheap path: the decoder skips the detail
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise DataError(
                f"image is {image.width}x{image.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}",
                path=label,
                fix="downscale it first (the models work at a few hundred pixels)",
            )
        image.load()
    except FileNotFoundError:
        raise DataError("image file not found", path=label, fix="check the image root / path") from None
    except Image.DecompressionBombError as err:
        raise DataError(
            f"image refused as a decompression bomb ({err})", path=label, fix="downscale it first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"image cannot be decoded ({err})",
            path=label,
            fix="re-download or re-encode the file; it is truncated or not an image",
        ) from None
    rgb = as_rgb(image, name=label)
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side))
    if expected_size is not None and rgb.size != tuple(expected_size):
        raise DataError(
            f"image is {rgb.size[0]}x{rgb.size[1]} but its annotation says {expected_size[0]}x{expected_size[1]} (WxH)",
            path=label,
            fix="the image and the annotation file do not belong together; check the image root",
        )
    return rgb


def as_rgb(image: Image.Image, *, name: str = "<in-memory image>") -> Image.Image:
    """``image`` in mode RGB, by the rules :func:`load_rgb` applies to files: 16/32-bit single-channel images
    (depth maps, which ``convert("RGB")`` would saturate), modes without a defined conversion and transparent
    pixels (whose colour is undefined) raise :class:`DataError` naming ``name``; other modes are converted."""
    label = name
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise DataError(
            f"image has mode {mode!r} (a single-channel 16/32-bit image), expected an RGB photo",
            path=label,
            fix="this looks like a depth map: read it with perceptio.data.readers.read_depth_map",
        )
    if mode not in _RGB_CONVERTIBLE:
        raise DataError(
            f"image has mode {mode!r}, which has no defined conversion to RGB here",
            path=label,
            fix="convert it to RGB first (e.g. with PIL: Image.open(path).convert('RGB') after checking the colours)",
        )
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if (alpha < 255).any():
            raise DataError(
                f"image has mode {mode!r} with {int((alpha < 255).sum())} transparent pixels; "
                "their colour is undefined",
                path=label,
                fix="flatten it onto a background first, e.g. Image.alpha_composite(background, img).convert('RGB')",
            )
    return image.convert("RGB") if mode != "RGB" else image


@dataclass(frozen=True)
class ImageRef:
    """An image on disk or in memory, decoded on :meth:`load`.

    Attributes:
        path: where the image file is (None for in-memory images).
        data: the encoded bytes (None for files).
        size: ``(width, height)`` as the annotation claims it, checked on load; None when unknown.
        name: how errors name the image when it has no path (e.g. ``"file.tsv:12 [index 7]"``).
    """

    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    size: tuple[int, int] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of `path` or `data`")

    def load(self) -> Image.Image:
        """Decode the image as RGB. Raises DataError naming the file when it is missing, broken or mismatched."""
        source: str | Path | bytes = self.path if self.path is not None else self.data  # type: ignore[assignment]
        return load_rgb(source, name=self.name or (str(self.path) if self.path else None), expected_size=self.size)

    def describe(self) -> str:
        return self.name or (str(self.path) if self.path is not None else "<image bytes>")


# ---------------------------------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class MaskRef:
    """A COCO-style segmentation (polygons or RLE) of an image of known size, decoded on :meth:`decode`.

    Attributes:
        segmentation: a list of flat polygons ``[[x1, y1, x2, y2, ...], ...]``, an RLE dict
            ``{"size": [h, w], "counts": str | bytes | list[int]}``, or None / ``[]`` for an empty mask.
        height: image height in pixels.
        width: image width in pixels.
        name: how errors name this mask (e.g. ``"instances.json [ann 123]"``).
    """

    segmentation: Any
    height: int
    width: int
    name: str | None = None

    def decode(self, *, lisa_compat: bool = False) -> np.ndarray:
        """Rasterise to a boolean (H, W) mask.

        Args:
            lisa_compat: reproduce LISA/Sa2VA's rasterisation, which sums overlapping polygons of one object and
                so drops pixels covered twice (value 2) from the mask. Off by default: the correct mask is the
                union of the polygons.
        """
        from pycocotools import mask as mask_utils  # lazy: pycocotools is only needed when masks are decoded

        seg = self.segmentation
        h, w = int(self.height), int(self.width)
        if seg is None or (isinstance(seg, list) and len(seg) == 0):
            return np.zeros((h, w), dtype=bool)
        try:
            if isinstance(seg, list):
                polygons = [list(map(float, p)) for p in seg]
                bad = [i for i, p in enumerate(polygons) if len(p) < 6 or len(p) % 2]
                if bad:
                    raise DataError(
                        f"polygon {bad[0]} has {len(polygons[bad[0]])} coordinates; "
                        "a polygon needs an even number, at least 6",
                        path=self.name,
                        fix="drop degenerate polygons from the annotation",
                    )
                rles = mask_utils.frPyObjects(polygons, h, w)
                if lisa_compat:
                    stacked = mask_utils.decode(rles).astype(np.uint8).sum(axis=2)
                    return stacked == 1
                return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
            if isinstance(seg, dict):
                size = [int(v) for v in seg.get("size", (h, w))]
                if size != [h, w]:
                    raise DataError(
                        f"RLE size {size[0]}x{size[1]} (HxW) differs from the image size {h}x{w}",
                        path=self.name,
                        fix="the mask was made for another image or resolution; re-encode it at the image size",
                    )
                counts = seg.get("counts")
                if isinstance(counts, list):  # uncompressed RLE
                    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
                else:
                    rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
                return mask_utils.decode(rle).astype(bool)
        except DataError:
            raise
        except Exception as err:  # pycocotools raises bare TypeError/ValueError on malformed input
            raise DataError(
                f"segmentation cannot be decoded ({err})", path=self.name, fix="check the annotation"
            ) from None
        raise DataError(
            f"segmentation has type {type(seg).__name__}; expected a polygon list or an RLE dict",
            path=self.name,
            fix="use COCO polygons or RLE",
        )


# ---------------------------------------------------------------------------------------------------- depth


@dataclass(frozen=True)
class DepthRef:
    """A depth map file (``.npy``, ``.npz`` or PNG) and its convention, decoded on :meth:`load`.

    Attributes:
        path: the file.
        convention: what its values mean.
        key: the array name inside an ``.npz`` (None: the file must hold exactly one array).
        size: ``(width, height)`` the map must have (the RGB image's size), checked on load; None to skip.
    """

    path: Path
    convention: DepthConvention
    key: str | None = None
    size: tuple[int, int] | None = None

    def load(self) -> DepthMap:
        depth = read_depth_map(self.path, self.convention, key=self.key)
        if self.size is not None:
            h, w = depth.values.shape
            if (w, h) != tuple(self.size):
                raise DataError(
                    f"depth map is {w}x{h} but its image is {self.size[0]}x{self.size[1]} (WxH)",
                    path=self.path,
                    fix="pair each depth map with its own image, or resize it with nearest neighbour",
                )
        return depth


# --------------------------------------------------------------------------------------------------- sample


@dataclass(frozen=True)
class Sample:
    """One item of any dataset: an image (or several), a query, and whatever targets the task has.

    Attributes:
        sample_id: unique within its source and split, stable across runs (used for resuming and joining).
        task: what the sample asks for.
        source: the dataset it came from (``"refcoco"``, ``"hardblink"``, ``"mmbench"``, ``"synthetic"``, ...).
        split: the split it belongs to, or None when the format has none.
        images: the input image(s); most samples have exactly one.
        query: the user-side text: a referring expression, or a question. For conversations, the first user
            turn (see ``conversation`` for all turns).
        answer: the gold answer: a letter such as ``"A"`` for multiple choice and relative depth, short text
            for VQA, None where the benchmark hides it or the task has no text answer.
        choices: option texts in letter order (A, B, ...), for multiple choice.
        masks: target masks; the target is their union (one mask for RefCOCO, several for gRefCOCO-style
            multi-object refs, none for a no-target expression).
        depth: the target depth map, if any.
        points: labelled markers drawn on the image, if known.
        conversation: all turns, for conversation data; empty otherwise.
        meta: everything else the source provides (image id, category, index, ...), as plain values.
    """

    sample_id: str
    task: Task
    source: str
    split: str | None = None
    images: tuple[ImageRef, ...] = ()
    query: str = ""
    answer: str | None = None
    choices: tuple[str, ...] = ()
    masks: tuple[MaskRef, ...] = ()
    depth: DepthRef | None = None
    points: tuple[Point, ...] = ()
    conversation: tuple[Turn, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> ImageRef:
        """The single input image. Raises if the sample has none or several."""
        if len(self.images) != 1:
            raise ValueError(f"sample {self.sample_id} has {len(self.images)} images; use `.images`")
        return self.images[0]

    @property
    def letters(self) -> tuple[str, ...]:
        """The valid answer letters: one per choice, or one per marker for relative-depth questions."""
        n = len(self.choices) or len(self.points) or int(self.meta.get("num_points", 0))
        return tuple(chr(ord("A") + i) for i in range(n))

    def target_mask(self, *, lisa_compat: bool = False) -> np.ndarray:
        """The union of ``masks`` as a bool (H, W) array (all False for a no-target sample)."""
        if not self.masks:
            width, height = self.image.size or self.image.load().size
            return np.zeros((height, width), dtype=bool)
        out = self.masks[0].decode(lisa_compat=lisa_compat)
        for mask in self.masks[1:]:
            other = mask.decode(lisa_compat=lisa_compat)
            if other.shape != out.shape:
                raise DataError(
                    f"masks of one sample differ in size ({out.shape} vs {other.shape})",
                    item=self.sample_id,
                    fix="all masks of a sample must be at the image resolution",
                )
            out |= other
        return out

    def with_meta(self, **extra: Any) -> Sample:
        return replace(self, meta={**self.meta, **extra})
