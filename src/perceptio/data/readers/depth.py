"""Depth maps: ``.npy`` / ``.npz`` arrays and 8- or 16-bit PNGs, decoded under an explicit convention.

A file's numbers mean nothing without their convention (:class:`~perceptio.data.schema.DepthConvention`):
NYU PNGs hold millimetres, KITTI PNGs metres x 256, Depth Anything PNGs relative inverse depth in 0..255.
PNG bit depth is checked against the convention, because reading an 8-bit map as millimetres (or the
reverse) gives plausible-looking garbage rather than an error.
"""

from __future__ import annotations

from pathlib import Path

from perceptio.data.depth_files import DEPTH_CONVENTIONS, DEPTH_SUFFIXES, DepthConvention, read_depth_map
from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers._common import build_samples, check_skip_args, require_dir
from perceptio.data.schema import DepthRef, ImageRef, Sample, Task

__all__ = ["IMAGE_SUFFIXES", "DEPTH_SUFFIXES", "read_depth_folder", "read_depth_map"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A depth file next to its image is often named "<image stem>_depth" (Depth Anything outputs, ADE20K copies).
_DEPTH_STEM_SUFFIX = "_depth"


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
