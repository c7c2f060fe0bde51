"""A contact sheet of a synthetic world, drawn from what the real-format readers load back.

Reading through the readers (RefCOCO, depth folder, HardBLINK, conversation JSON) rather than the renderer's
memory means the picture shows exactly what training and evaluation will see.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from PIL import Image

from perceptio.data.errors import DataError
from perceptio.data.readers import read_conversations, read_depth_folder, read_hardblink, read_refer
from perceptio.data.schema import Sample
from perceptio.utils.viz import colorize_depth, overlay_masks, text_panel

__all__ = ["contact_sheet"]

_REFCOCO_SPLITS = {"train": ("train",), "val": ("val",), "test": ("testA", "testB")}


def _image_key(sample: Sample) -> str:
    ref = sample.images[0]
    return Path(ref.path).name if ref.path is not None else str(sample.meta.get("source_image"))


def contact_sheet(world_dir: str | Path, *, n: int = 16, split: str = "val", columns: int = 2) -> Image.Image:
    """Draw ``n`` scenes of ``split``: image with referred masks, depth, marker image, and the texts.

    Args:
        world_dir: a folder written by :func:`perceptio.data.synthetic.generate_world`.
        n: number of scenes.
        split: ``train``, ``val`` or ``test``.
        columns: scenes per row of the sheet.

    Returns:
        The sheet as an RGB image.
    """
    root = Path(world_dir)
    if split not in _REFCOCO_SPLITS:
        raise DataError(f"unknown split {split!r}", path=root, fix=f"use one of {sorted(_REFCOCO_SPLITS)}")
    if not (root / "manifest.json").is_file():
        raise DataError(
            "not a synthetic world folder (no manifest.json)",
            path=root,
            fix="run `perceptio data synth --out DIR` first",
        )

    refs: dict[str, list[Sample]] = defaultdict(list)
    for refcoco_split in _REFCOCO_SPLITS[split]:
        try:
            for s in read_refer(root, "refcoco", split=refcoco_split, image_root=root / "images"):
                refs[_image_key(s)].append(s)
        except DataError:
            if refcoco_split not in ("testA", "testB"):  # a small world may have no sparse (or no crowded) test scene
                raise
    depth = {_image_key(s): s for s in read_depth_folder(root / "depth" / split, image_dir=root / "images")}
    markers: dict[str, Sample] = {}
    if (root / "hardblink" / split).is_dir():
        markers = {str(s.meta["source_image"]): s for s in read_hardblink(root / "hardblink" / split, split=split)}
    vqa: dict[str, list[Sample]] = defaultdict(list)
    vqa_file = root / "vqa" / f"{split}.json"
    if vqa_file.is_file():
        for s in read_conversations(vqa_file, image_root=root / "images", split=split):
            vqa[_image_key(s)].append(s)

    names = sorted(depth)[:n]
    if not names:
        raise DataError(f"split {split!r} has no images", path=root, fix="generate more images or pick another split")
    tiles = [_tile(name, depth[name], refs.get(name, []), markers.get(name), vqa.get(name, [])) for name in names]
    tile_w = max(t.width for t in tiles)
    tile_h = max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile_w + (columns + 1) * 6, rows * tile_h + (rows + 1) * 6), (200, 200, 200))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (6 + (k % columns) * (tile_w + 6), 6 + (k // columns) * (tile_h + 6)))
    return sheet


def _tile(name: str, depth_sample: Sample, refs: list[Sample], marker: Sample | None, vqa: list[Sample]) -> Image.Image:
    image = depth_sample.image.load()
    size = image.width
    objects: dict[object, Sample] = {}  # one expression per referred object (refs hold several sentences each)
    for s in refs:
        objects.setdefault(s.meta.get("ann_id"), s)
    refs = list(objects.values())[:3]
    panels = [overlay_masks(image, [s.target_mask() for s in refs])]
    depth_map = depth_sample.depth.load()  # type: ignore[union-attr]
    panels.append(colorize_depth(depth_map.values, valid=depth_map.valid).resize(image.size, Image.NEAREST))
    panels.append(marker.image.load() if marker is not None else Image.new("RGB", image.size, (235, 235, 235)))
    scale = max(1, 192 // size)
    panels = [p.resize((size * scale, size * scale), Image.NEAREST) for p in panels]
    width = sum(p.width for p in panels) + 2 * (len(panels) - 1)
    lines = [name]
    lines += [f"mask {k + 1}: {s.query}" for k, s in enumerate(refs)]
    if marker is not None:
        lines.append(f"markers ({len(marker.points)}): closest = ({marker.answer})")
    lines += [f"Q: {s.query.replace('<image>', '').strip()}  A: {s.answer}" for s in vqa]
    text = text_panel(lines, width, max_lines=9)
    tile = Image.new("RGB", (width, panels[0].height + text.height), (255, 255, 255))
    x = 0
    for panel in panels:
        tile.paste(panel, (x, 0))
        x += panel.width + 2
    tile.paste(text, (0, panels[0].height))
    return tile
