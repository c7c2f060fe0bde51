"""Small drawing helpers shared by `perceptio data show`, prediction outputs and reports (PIL + numpy only)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colorize_depth", "line_chart", "overlay_masks", "text_panel"]

# Anchor colours of a perceptually ordered dark-to-bright map (purple -> orange -> pale yellow), interpolated
# linearly; enough for looking at depth, no plotting library needed.
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)

#: Distinct colours for mask overlays.
MASK_COLORS = [(255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 80, 255), (0, 220, 220)]


def colorize_depth(values: np.ndarray, *, valid: np.ndarray | None = None, inverse: bool = True) -> Image.Image:
    """Colour-map a depth map (H, W): bright = near. Invalid or non-finite pixels are black.

    Args:
        values: depth (larger = farther) when ``inverse`` is True; otherwise already inverse depth (larger = nearer).
        valid: optional bool (H, W) of pixels to show.
        inverse: convert depth to inverse depth before normalising, so near structure gets the contrast.
    """
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (values > 0 if inverse else True)
    if valid is not None:
        ok &= valid
    shown = np.zeros_like(values)
    if ok.any():
        v = 1.0 / values[ok] if inverse else values[ok]
        lo, hi = v.min(), v.max()
        shown[ok] = (v - lo) / (hi - lo) if hi > lo else 0.5
    position = shown * (len(_ANCHORS) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    rgb = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac
    rgb[~ok] = 0
    return Image.fromarray(rgb.round().astype(np.uint8))


def overlay_masks(image: Image.Image, masks: list[np.ndarray], *, alpha: float = 0.5) -> Image.Image:
    """Blend bool (H, W) masks onto an RGB image in distinct colours, with a one-pixel outline."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64).copy()
    for k, mask in enumerate(masks):
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask {k} has shape {mask.shape}, image is {rgb.shape[:2]}")
        color = np.asarray(MASK_COLORS[k % len(MASK_COLORS)], dtype=np.float64)
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * color
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        rgb[edge] = color
    return Image.fromarray(rgb.round().astype(np.uint8))


def text_panel(lines: list[str], width: int, *, font_size: int = 11, max_lines: int | None = None) -> Image.Image:
    """Render lines of text (wrapped to ``width`` pixels) on a white panel."""
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[str] = []
    for line in lines:
        words, current = line.split(), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if probe.textlength(trial, font=font) <= width - 8 or not current:
                current = trial
            else:
                wrapped.append(current)
                current = word
        wrapped.append(current)
    if max_lines is not None and len(wrapped) > max_lines:
        wrapped = wrapped[: max_lines - 1] + ["..."]
    line_height = font_size + 3
    panel = Image.new("RGB", (width, line_height * len(wrapped) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(wrapped):
        draw.text((4, 3 + i * line_height), line, fill=(20, 20, 20), font=font)
    return panel


#: Line colours of :func:`line_chart`.
LINE_COLORS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (23, 190, 207),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
]


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str = "",
    x_label: str = "step",
    log_y: bool = False,
    size: tuple[int, int] = (640, 360),
) -> Image.Image:
    """A line chart of named (x, y) series with axes, ticks and a legend (PIL only; no plotting library).

    Non-finite points are left out; with ``log_y`` so are non-positive ones.
    """
    width, height = size
    left, right, top, bottom = 56, 170, 28, 40
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)
    clean = {
        name: [(x, y) for x, y in points if np.isfinite(y) and np.isfinite(x) and (y > 0 or not log_y)]
        for name, points in series.items()
    }
    clean = {name: points for name, points in clean.items() if points}
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    if not clean:
        draw.text((left, height // 2), "no data", fill=(120, 120, 120), font=font)
        return image
    xs = [x for points in clean.values() for x, _ in points]
    ys = [np.log10(y) if log_y else y for points in clean.values() for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        yy = np.log10(y) if log_y else y
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (yy - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for k in range(5):  # ticks
        fx, fy = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        px = left + k * (width - left - right) / 4
        py = height - bottom - k * (height - top - bottom) / 4
        draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 12, height - bottom + 6), f"{fx:.0f}", fill=(0, 0, 0), font=font)
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        label = f"{10**fy:.3g}" if log_y else f"{fy:.3g}"
        draw.text((4, py - 6), label, fill=(0, 0, 0), font=font)
        draw.line([left + 1, py, width - right - 1, py], fill=(235, 235, 235))
    draw.text(((width - right + left) // 2 - 10, height - 16), x_label, fill=(0, 0, 0), font=font)
    for k, (name, points) in enumerate(clean.items()):
        color = LINE_COLORS[k % len(LINE_COLORS)]
        pixels = [to_px(x, y) for x, y in sorted(points)]
        if len(pixels) == 1:
            px, py = pixels[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        else:
            draw.line(pixels, fill=color, width=2)
        ly = top + 4 + 16 * k
        draw.line([width - right + 8, ly + 6, width - right + 24, ly + 6], fill=color, width=2)
        draw.text((width - right + 28, ly), name, fill=(0, 0, 0), font=font)
    return image
