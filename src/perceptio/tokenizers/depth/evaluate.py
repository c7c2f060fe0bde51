"""How well a depth tokenizer keeps depth: reconstruction metrics, closest-point accuracy, codebook use.

Every teacher map is encoded and decoded, and the decoded map is compared with the teacher map:

* AbsRel, RMSE (metres) and delta < 1.25 in **metric depth**, when the teacher is metric: both maps are mapped
  back with the teacher map's own inverse-depth range. For a relative teacher (Depth Anything's disparity is
  known only up to scale and shift) these are not defined and are reported as None;
* ``rmse_normalized``: RMSE of the normalised [0, 1] maps themselves, for every teacher;
* pixels without a measurement (``TeacherMap.valid``) are left out of every metric and never carry a point;
* closest-point accuracy for 2, 3, 4 and 5 points (AURORA's "VQ-VAE upper bound"): points are drawn on the
  teacher map with the synthetic world's marker rule (in the mid-height band of rows 35-65 %, as HardBLINK's
  markers, so that "lower in the image is nearer" does not answer the question; the closest at least 15 %
  nearer in inverse depth than the next, any two at least 5 % apart and 10 % of the width apart); the decoded
  map answers correctly when its largest value at the points is at the teacher's closest point;
* codebook usage (share of codes used at least once) and perplexity of the code histogram.

The same metrics are computed for a baseline that predicts the mean training map for every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from perceptio.data.formats import MARKER_RULE
from perceptio.tokenizers.depth.model import DepthTokenizer
from perceptio.tokenizers.depth.normalize import denormalize_depth
from perceptio.tokenizers.depth.teachers import TeacherMap
from perceptio.utils.viz import colorize_depth, text_panel

__all__ = ["PointRule", "closest_point_sets", "depth_metrics", "evaluate_tokenizer", "reconstruction_grid"]


@dataclass(frozen=True)
class PointRule:
    """How closest-point test sets are drawn; the margins default to the marker rule of relative-depth questions
    (:data:`perceptio.data.formats.MARKER_RULE`, which the synthetic world's questions follow too)."""

    band: tuple[float, float] = MARKER_RULE.band
    closest_gap: float = MARKER_RULE.closest_gap
    min_gap: float = MARKER_RULE.min_gap
    min_distance: float = MARKER_RULE.min_distance
    sets_per_image: int = 4
    tries: int = 200


def closest_point_sets(
    inverse: np.ndarray, num_points: int, rule: PointRule, rng: np.random.Generator, valid: np.ndarray | None = None
) -> list[np.ndarray]:
    """Up to ``rule.sets_per_image`` sets of (row, col) points (num_points, 2) on an inverse-depth map (H, W),
    drawn only on ``valid`` pixels when a mask is given."""
    h, w = inverse.shape
    min_dist2 = (rule.min_distance * w) ** 2
    sets = []
    for _ in range(rule.tries):
        if len(sets) == rule.sets_per_image:
            break
        rows = rng.integers(max(2, int(rule.band[0] * h)), min(h - 2, int(rule.band[1] * h)) + 1, size=num_points)
        cols = rng.integers(2, w - 2, size=num_points)
        values = inverse[rows, cols]
        if (values <= 0).any() or (valid is not None and not valid[rows, cols].all()):
            continue
        d2 = (
            (rows[:, None] - rows[None]) ** 2
            + (cols[:, None] - cols[None]) ** 2
            + np.eye(num_points, dtype=int) * 10**9
        )
        if d2.min() < min_dist2:
            continue
        ordered = np.sort(values)[::-1]  # nearest first
        if ordered[0] < ordered[1] * (1 + rule.closest_gap) or np.any(ordered[:-1] < ordered[1:] * (1 + rule.min_gap)):
            continue
        sets.append(np.stack([rows, cols], axis=1))
    return sets


def depth_metrics(prediction: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """AbsRel, RMSE and delta < 1.25 of depth maps, over pixels where the *target* is valid, finite and positive.

    Predicted values are floored at 1e-6 (a failed, zero prediction still counts, and counts as wrong).
    """
    ok = np.isfinite(target) & (target > 0)
    if valid is not None:
        ok &= valid
    t = target[ok].astype(np.float64)
    if t.size == 0:
        return {"abs_rel": float("nan"), "rmse": float("nan"), "delta1": float("nan")}
    p = np.nan_to_num(prediction[ok].astype(np.float64), nan=1e-6, posinf=1e12).clip(min=1e-6)
    return {
        "abs_rel": float(np.mean(np.abs(p - t) / t)),
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "delta1": float(np.mean(np.maximum(p / t, t / p) < 1.25)),
    }


class _Accumulator:
    def __init__(self, point_counts: Sequence[int]) -> None:
        self.metrics: list[dict[str, float]] = []
        self.rmse_norm: list[float] = []
        self.correct = {n: 0 for n in point_counts}
        self.total = {n: 0 for n in point_counts}

    def add(self, decoded: np.ndarray, teacher: TeacherMap, point_sets: dict[int, list[np.ndarray]]) -> None:
        if teacher.metric:
            self.metrics.append(
                depth_metrics(
                    denormalize_depth(decoded, teacher.stats),
                    denormalize_depth(teacher.depth, teacher.stats),
                    teacher.valid,
                )
            )
        self.rmse_norm.append(float(np.sqrt(np.mean((decoded - teacher.depth)[teacher.valid] ** 2))))

        for n, sets in point_sets.items():
            for points in sets:
                truth = np.argmax(teacher.depth[points[:, 0], points[:, 1]])
                guess = np.argmax(decoded[points[:, 0], points[:, 1]])
                self.correct[n] += int(truth == guess)
                self.total[n] += 1

    def result(self) -> dict[str, object]:
        keys = ("abs_rel", "rmse", "delta1")
        out: dict[str, object] = {
            k: float(np.nanmean([m[k] for m in self.metrics])) if self.metrics else None for k in keys
        }
        out["rmse_normalized"] = float(np.mean(self.rmse_norm))
        out["closest_point_accuracy"] = {
            str(n): (self.correct[n] / self.total[n] if self.total[n] else None) for n in self.correct
        }
        out["closest_point_sets"] = {str(n): self.total[n] for n in self.total}
        return out


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: DepthTokenizer,
    maps: Sequence[TeacherMap],
    *,
    mean_map: np.ndarray | None = None,
    point_counts: Sequence[int] = (2, 3, 4, 5),
    rule: PointRule | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, object]:
    """Encode/decode every teacher map and measure what is kept (see the module docstring).

    Args:
        tokenizer: the tokenizer (put in eval mode here).
        maps: teacher maps at the tokenizer's input size.
        mean_map: (S, S) mean training map for the baseline; None skips the baseline.
        point_counts: point counts of the closest-point test.
        rule: how point sets are drawn.
        seed: seed of the point sets (the same sets are used for the tokenizer and the baseline).
        batch_size: maps per encode/decode call.

    Returns:
        ``{"tokenizer": {...}, "mean_map_baseline": {...}, "codebook": {...}, "num_maps", "space"}``.
    """
    tokenizer.eval()
    if len({m.metric for m in maps}) > 1:
        raise ValueError("the maps mix metric and relative teachers; evaluate them separately")
    rule = rule or PointRule()
    rng = np.random.default_rng(seed)
    ours, baseline = _Accumulator(point_counts), _Accumulator(point_counts)
    histogram = np.zeros(tokenizer.config.num_codes, dtype=np.int64)
    for start in range(0, len(maps), batch_size):
        chunk = maps[start : start + batch_size]
        depth = torch.from_numpy(np.stack([m.depth for m in chunk]))
        codes = tokenizer.encode(depth)
        decoded = tokenizer.decode(codes).cpu().numpy()
        histogram += np.bincount(codes.reshape(-1).cpu().numpy(), minlength=tokenizer.config.num_codes)
        for k, teacher in enumerate(chunk):
            inverse = denormalize_depth(teacher.depth, teacher.stats, quantity="inverse_depth")
            point_sets = {n: closest_point_sets(inverse, n, rule, rng, teacher.valid) for n in point_counts}
            ours.add(decoded[k], teacher, point_sets)
            if mean_map is not None:
                baseline.add(mean_map, teacher, point_sets)
    probs = histogram / max(1, histogram.sum())
    nonzero = probs[probs > 0]
    result: dict[str, object] = {
        "num_maps": len(maps),
        "space": "metric_depth" if maps and maps[0].metric else "relative_inverse_depth",
        "tokenizer": ours.result(),
        "codebook": {
            "usage": float((histogram > 0).mean()),
            "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
            "num_codes": tokenizer.config.num_codes,
        },
    }
    if mean_map is not None:
        result["mean_map_baseline"] = baseline.result()
    return result


@torch.no_grad()
def reconstruction_grid(tokenizer: DepthTokenizer, maps: Sequence[TeacherMap], *, n: int = 8) -> Image.Image:
    """Teacher map next to its decoded reconstruction for the first ``n`` maps (one row each)."""
    chosen = list(maps[:n])
    decoded = tokenizer.decode(tokenizer.encode(torch.from_numpy(np.stack([m.depth for m in chosen])))).cpu().numpy()
    size = max(128, tokenizer.config.input_size)
    tiles = []
    for teacher, recon in zip(chosen, decoded, strict=True):
        pair = Image.new("RGB", (2 * size + 4, size), (255, 255, 255))
        pair.paste(colorize_depth(teacher.depth, inverse=False).resize((size, size), Image.NEAREST), (0, 0))
        pair.paste(colorize_depth(recon, inverse=False).resize((size, size), Image.NEAREST), (size + 4, 0))
        tiles.append(pair)
    labels = text_panel(["teacher (left) / decoded (right), bright = near"], 2 * size + 4)
    grid = Image.new("RGB", (2 * size + 4, labels.height + len(tiles) * (size + 4)), (255, 255, 255))
    grid.paste(labels, (0, 0))
    for k, tile in enumerate(tiles):
        grid.paste(tile, (0, labels.height + k * (size + 4)))
    return grid
