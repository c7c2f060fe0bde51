"""Small drawing helpers shared by `perceptio data show`, prediction outputs and reports: colour maps, overlays and
text panels with PIL; charts with matplotlib."""

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
    y_label: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (640, 360),
) -> Image.Image:
    """A line chart of named (x, y) series with axes, grid and a legend, drawn by matplotlib (Agg, no display).

    Non-finite points are left out; with ``log_y`` so are non-positive ones. Series are drawn in
    :data:`LINE_COLORS` order.
    """
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    clean = {
        name: sorted((x, y) for x, y in points if np.isfinite(y) and np.isfinite(x) and (y > 0 or not log_y))
        for name, points in series.items()
    }
    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=10, loc="left")
    axes.set_xlabel(x_label, fontsize=9)
    if y_label:
        axes.set_ylabel(y_label, fontsize=9)
    axes.tick_params(labelsize=8)
    axes.grid(True, color="#e6e6e6", linewidth=0.8)
    drawn = 0
    for k, (name, points) in enumerate(clean.items()):
        if not points:
            continue
        color = tuple(c / 255 for c in LINE_COLORS[k % len(LINE_COLORS)])
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, color=color, linewidth=2, marker="o" if len(points) == 1 else None, label=name)
        drawn += 1
    if log_y and drawn:
        axes.set_yscale("log")
    if drawn:
        axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", color="#787878")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
