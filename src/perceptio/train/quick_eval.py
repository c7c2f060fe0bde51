"""The quick evaluation run during training: unconstrained greedy generation on a few held-out samples.

It reports what tells a run is working, not benchmark numbers (``perceptio eval`` computes those):

* ``span_ok``: the share of samples whose target holds a depth span for which the model wrote one well-formed
  span (decoding is *not* constrained here, so malformed spans count);
* ``seg_ciou``: cumulative IoU of the (OR-ed) predicted masks against the target masks, referring segmentation;
* ``answer_acc``: letter or short-answer accuracy on relative depth, multiple choice and VQA.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from perceptio.data.schema import Task
from perceptio.data.templates import render_sample
from perceptio.eval.extract import extract_letter, normalize_answer
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.models.processing import PerceptioProcessor
from perceptio.train.data import TrainingData, needs_depth_span

__all__ = ["quick_eval"]


@torch.no_grad()
def quick_eval(
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    data: TrainingData,
    *,
    samples: int = 16,
    batch_size: int = 8,
) -> dict[str, float]:
    """Metrics per dataset (``{name}/{metric}``) on the first ``samples`` samples of each dataset of ``data``."""
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)  # the first phrasing of each template family, the same at every evaluation
    for name, dataset in data.datasets.items():
        chosen = dataset[:samples]
        codes = data.codes[name]
        queries = [
            render_sample(s, data.vocab, rng, depth_codes=codes[k], spatial_cot=data.config.spatial_cot).query
            for k, s in enumerate(chosen)
        ]
        images = [s.image.load() for s in chosen]
        predictions = model.predict(images, queries, processor, constrain=False, batch_size=batch_size)
        counts: dict[str, list[float]] = defaultdict(list)
        inter = union = 0
        for sample, image, prediction in zip(chosen, images, predictions, strict=True):
            if needs_depth_span(sample, data.config):
                counts["span_ok"].append(float(prediction.depth_codes is not None and not prediction.issues))
            if sample.task is Task.REFERRING_SEGMENTATION:
                target = np.zeros((image.height, image.width), dtype=bool)
                for mask in sample.masks:
                    target |= mask.decode().astype(bool)
                predicted = np.zeros_like(target)
                for mask in prediction.masks:
                    predicted |= mask
                inter += int((target & predicted).sum())
                union += int((target | predicted).sum())
            elif sample.task in (Task.RELATIVE_DEPTH, Task.MULTIPLE_CHOICE) and sample.answer is not None:
                letter = extract_letter(prediction.answer, len(sample.letters))
                counts["answer_acc"].append(float(letter == sample.answer))
            elif sample.task is Task.VQA and sample.answer is not None:
                counts["answer_acc"].append(
                    float(normalize_answer(prediction.answer) == normalize_answer(sample.answer))
                )
        for metric, values in counts.items():
            out[f"{name}/{metric}"] = float(np.mean(values))
        if any(s.task is Task.REFERRING_SEGMENTATION for s in chosen):
            out[f"{name}/seg_ciou"] = inter / union if union else 0.0
    return out
