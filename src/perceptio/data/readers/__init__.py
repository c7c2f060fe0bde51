"""Readers that turn benchmark and training files into :class:`~perceptio.data.schema.Sample` lists.

Every reader reads annotations eagerly and leaves images, masks and depth maps as lazy refs. Each takes
``skip_bad`` and ``report``: without ``skip_bad`` a bad item raises :class:`~perceptio.data.errors.DataError`
(naming the file, line or item, and the fix); with it, the item is recorded in the report and skipped.
:func:`check_samples` decodes everything once, to find broken files before a long run does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any

from perceptio.data.errors import BadItemReport, DataError, handle
from perceptio.data.readers._common import check_skip_args
from perceptio.data.readers.blink import read_blink
from perceptio.data.readers.conversation import read_conversations
from perceptio.data.readers.depth import read_depth_folder, read_depth_map
from perceptio.data.readers.hardblink import available_points, read_hardblink
from perceptio.data.readers.mmbench import read_mmbench
from perceptio.data.readers.refer import assert_no_eval_images, eval_image_ids, load_refs, read_refer
from perceptio.data.schema import DepthRef, Sample, depth_values_problem

__all__ = [
    "READERS",
    "assert_no_eval_images",
    "available_points",
    "check_sample",
    "check_samples",
    "eval_image_ids",
    "load_refs",
    "read_blink",
    "read_conversations",
    "read_depth_folder",
    "read_depth_map",
    "read_hardblink",
    "usable_samples",
    "read_mmbench",
    "read_refer",
]

#: Reader by format name; every reader returns ``list[Sample]``.
READERS: dict[str, Callable[..., list[Sample]]] = {
    "refcoco": read_refer,
    "hardblink": read_hardblink,
    "blink": read_blink,
    "mmbench": read_mmbench,
    "conversation": read_conversations,
    "depth": read_depth_folder,
}


def _cached(key: str, decoded: dict[str, Any] | None, load: Callable[[], Any]) -> Any:
    """``load()``, or its result (or error) from an earlier call with the same ``key`` in ``decoded``."""
    if decoded is None:
        return load()
    if key not in decoded:
        try:
            decoded[key] = load()
        except DataError as err:
            decoded[key] = err
    if isinstance(decoded[key], DataError):
        raise decoded[key]
    return decoded[key]


def check_sample(sample: Sample, *, decoded: dict[str, Any] | None = None) -> None:
    """Decode every image, mask and depth map of ``sample`` and check that their sizes agree, and that the depth
    map is usable as a depth-span target (the depth tokenizer's rules).

    Masks and the depth map must have the (H, W) of the first image; points must lie inside it. Raises
    DataError naming the offending file. ``decoded`` (a dict kept across calls) remembers each image's size and
    each depth map's check, so that samples sharing an image decode it once.
    """
    sizes = [_cached(f"image:{ref.describe()}", decoded, lambda ref=ref: ref.load().size) for ref in sample.images]
    if not sizes:
        if sample.masks or sample.depth is not None or sample.points:
            raise DataError("sample has masks, depth or points but no image", fix="give the sample its image")
        return
    width, height = sizes[0]
    first = sample.images[0].describe()
    for mask in sample.masks:
        raster = mask.decode()
        if raster.shape != (height, width):
            raise DataError(
                f"mask is {raster.shape[0]}x{raster.shape[1]} but its image {first} is {height}x{width} (HxW)",
                path=mask.name,
                fix="the mask was made for another image or resolution; check the annotation's height/width",
            )
    if sample.depth is not None:
        shape = _cached(f"depth:{sample.depth.path}", decoded, lambda: _usable_depth_shape(sample.depth))
        if shape != (height, width):
            raise DataError(
                f"depth map is {shape[0]}x{shape[1]} but its image {first} is {height}x{width} (HxW)",
                path=sample.depth.path,
                fix="pair each depth map with its own image, or resize it with nearest neighbour",
            )
    for point in sample.points:
        if not (0 <= point.x < width and 0 <= point.y < height):
            raise DataError(
                f"point {point.label} at ({point.x}, {point.y}) lies outside the {width}x{height} image",
                path=first,
                fix="points are pixel coordinates (x right, y down) of the original image",
            )


def _usable_depth_shape(ref: DepthRef) -> tuple[int, int]:
    """The (H, W) of a depth map the depth tokenizer can take as a span target; DataError naming it otherwise."""
    depth = ref.load()
    problem = depth_values_problem(depth.values, quantity=depth.convention.quantity, valid=depth.valid)
    if problem is not None:
        raise DataError(
            f"depth map unusable as a depth-span target: {problem}",
            path=ref.path,
            fix="re-export the map (finite, varying, positive depth where valid), or leave it out (--skip-bad)",
        )
    return depth.values.shape


def usable_samples(
    samples: Iterable[Sample],
    *,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
    progress: bool = True,
    decoded: dict[str, Any] | None = None,
    where: str = "",
) -> list[Sample]:
    """The samples that fully decode (see :func:`check_sample`), with a tqdm progress bar when ``progress``.

    A failing sample raises DataError naming ``where`` (e.g. ``"dataset 'vqa', "``), the sample id and the file,
    or, with ``skip_bad``, is recorded in ``report`` and left out. ``decoded`` (kept across calls) decodes each
    image and depth map once, however many samples share it.
    """
    from tqdm import tqdm  # lazy: only needed for this slow, interactive check

    check_skip_args(skip_bad, report)
    total = len(samples) if isinstance(samples, Sized) else None
    decoded = {} if decoded is None else decoded
    kept = []
    bar = tqdm(samples, total=total, desc=f"checking {where or 'samples'}", unit="sample", disable=not progress)
    for sample in bar:
        try:
            check_sample(sample, decoded=decoded)
        except DataError as err:
            item = f"{where}sample {sample.sample_id}" + (f", {err.item}" if err.item is not None else "")
            located = DataError(err.problem, path=err.path, line=err.line, item=item, fix=err.fix)
            handle(located, skip_bad=skip_bad, report=report)
            continue
        kept.append(sample)
    return kept


def check_samples(
    samples: Iterable[Sample],
    *,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
    progress: bool = True,
) -> int:
    """Fully decode every sample (see :func:`usable_samples`); returns the number that passed."""
    return len(usable_samples(samples, skip_bad=skip_bad, report=report, progress=progress))
