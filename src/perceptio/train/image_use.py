"""The image-use gap: how much a model's loss depends on the image it is given.

For each task, the same examples are scored twice with teacher forcing: with their own images, and with the images
rolled by one within the batch (every question paired with another scene). The gap is the second loss minus the
first, per loss term and in total. Zero means the model's outputs do not depend on the image at all; the training
loss alone cannot tell that apart from a model that looks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["image_use_gap"]


@torch.no_grad()
def _losses(model, batch: dict[str, Any]) -> dict[str, float]:  # noqa: ANN001 - PerceptioForConditionalGeneration
    out = model(**batch)
    return {"loss": float(out.loss), **{k: float(v) for k, v in out.loss_terms.items()}}


def image_use_gap(
    model,  # noqa: ANN001 - PerceptioForConditionalGeneration
    processor,  # noqa: ANN001 - PerceptioProcessor
    data,  # noqa: ANN001 - perceptio.train.data.TrainingData
    *,
    samples: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per dataset of ``data``: the mean losses with the right and with shuffled images, and their difference.

    Returns:
        ``{name: {"real": {...}, "shuffled": {...}, "gap": float (total loss), "gap_terms": {...}, "count": int}}``;
        terms whose targets a task lacks are left out of ``gap_terms``.
    """
    from perceptio.train.data import collate

    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, items in data.datasets.items():
            count = min(samples, len(items))
            if count < 2:
                continue  # one example cannot be paired with another image
            examples = [data.example(name, i, rng) for i in range(count)]
            sums: dict[str, dict[str, float]] = {"real": {}, "shuffled": {}}
            weights = 0
            for start in range(0, count, batch_size):
                chunk: Sequence = examples[start : start + batch_size]
                if len(chunk) < 2:
                    chunk = examples[start - 1 : start + 1]  # keep a pair so the roll changes every image
                batch = collate(chunk, processor)
                batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                shuffled = dict(batch)
                shuffled["pixel_values"] = torch.roll(batch["pixel_values"], 1, dims=0)
                shuffled["sam_pixel_values"] = torch.roll(batch["sam_pixel_values"], 1, dims=0)
                for kind, inputs in (("real", batch), ("shuffled", shuffled)):
                    for term, value in _losses(model, inputs).items():
                        sums[kind][term] = sums[kind].get(term, 0.0) + value * len(chunk)
                weights += len(chunk)
            real = {k: v / weights for k, v in sums["real"].items()}
            shuffled_means = {k: v / weights for k, v in sums["shuffled"].items()}
            terms = {k: shuffled_means[k] - real[k] for k in real if k != "loss" and (real[k] or shuffled_means[k])}
            results[name] = {
                "real": real,
                "shuffled": shuffled_means,
                "gap": shuffled_means["loss"] - real["loss"],
                "gap_terms": terms,
                "count": count,
            }
    finally:
        model.train(was_training)
    return results
