"""What the demo shows for one prediction, as plain functions of arrays and text (no web framework): the masks on
the image, the decoded depth span as a colour map with the marker letters drawn on it, the span's code grid, and
the generated sequence with its spatial tokens made readable."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perceptio.data.schema import Point
from perceptio.utils.viz import colorize_depth, overlay_masks
from perceptio.vocab import SPATIAL_TOKEN_PATTERN, PerceptionVocab

__all__ = ["depth_view", "mask_view", "readable_sequence", "span_grid_html"]


def mask_view(image: Image.Image, masks: Sequence[np.ndarray]) -> Image.Image:
    """Each segmentation-token mask as a coloured overlay (with an outline) on the image."""
    return overlay_masks(image, list(masks))


def depth_view(depth: np.ndarray, points: Sequence[Point] = ()) -> Image.Image:
    """The decoded depth map ((H, W) in [0, 1], 1 = nearest) colour-mapped, bright = near, with each marker's
    letter drawn at its pixel (white on a dark outline, readable on any colour)."""
    picture = colorize_depth(depth, inverse=False)
    if points:
        draw = ImageDraw.Draw(picture)
        size = max(10, round(min(picture.size) / 12))
        font = ImageFont.load_default(size=size)
        for point in points:
            x, y = float(point.x), float(point.y)
            r = max(2, size // 4)
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 255), width=max(1, r // 2))
            draw.text((x + r + 1, y - size / 2), point.label, fill=(255, 255, 255), font=font,
                      stroke_width=max(1, size // 8), stroke_fill=(0, 0, 0))  # fmt: skip
    return picture


def span_grid_html(codes: np.ndarray | None) -> str:
    """The depth span's codes as an HTML table in the span's row order (one cell per code, shaded by the code's
    index so that repeated codes stand out); a sentence when there is no span."""
    if codes is None:
        return "<p>No depth span in this answer.</p>"
    grid = np.asarray(codes)
    top = max(int(grid.max()), 1)
    rows = []
    for row in grid:
        cells = []
        for code in row:
            shade = 255 - round(120 * int(code) / top)
            cells.append(f'<td style="background: rgb({shade},{shade},255); padding: 2px 5px">{int(code)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>depth span: {grid.shape[0]}x{grid.shape[1]} codes, row by row</caption>"
    return f'<table class="span-grid" style="font-family: monospace; font-size: 11px">{caption}{"".join(rows)}</table>'


def readable_sequence(text: str, vocab: PerceptionVocab) -> str:
    """The generated sequence with its spatial tokens made readable: a depth span (start marker, codes, end marker)
    becomes ``⟨depth span: N codes⟩`` (its codes are in the grid), the segmentation token ``⟨SEG⟩``, a code outside
    a span ``⟨code K⟩``."""
    out: list[str] = []
    position, count = 0, None  # count: codes seen in the open span (None: no span open)
    for match in SPATIAL_TOKEN_PATTERN.finditer(text):
        gap = text[position : match.start()]
        if count is not None and gap.strip():  # text inside a span: the span was cut off
            out.append(f"⟨depth span: {count} codes, not closed⟩")
            count = None
        out.append(gap)
        token = match.group(0)
        if token == vocab.depth_start_token:
            count = 0
        elif match.group(1) is not None:
            if count is None:
                out.append(f"⟨code {match.group(1)}⟩")
            else:
                count += 1
        elif token == vocab.depth_end_token:
            out.append(f"⟨depth span: {count or 0} codes⟩" if count is not None else "⟨span end⟩")
            count = None
        else:
            out.append("⟨SEG⟩")
        position = match.end()
    if count is not None:
        out.append(f"⟨depth span: {count} codes, not closed⟩")
    out.append(text[position:])
    return "".join(out)
