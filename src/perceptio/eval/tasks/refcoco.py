"""Referring segmentation on RefCOCO, RefCOCO+ and RefCOCOg: cIoU and gIoU as LISA and Sa2VA report them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perceptio.data.readers import read_refer
from perceptio.data.schema import Sample
from perceptio.eval.metrics import SegmentationMeter
from perceptio.eval.tasks.base import EvalTask, register


@register
class RefCOCO(EvalTask):
    """cIoU (intersection and union summed over the split) and gIoU; several predicted masks are OR-ed (or, with
    ``first_mask``, the first alone), no segmentation token is an empty mask, and masks are compared at the
    original image size."""

    name = "refcoco"
    data_help = "the refer root (refcoco/refs(unc).p, instances.json); --dataset refcoco, refcoco+ or refcocog"
    options = ("dataset", "first_mask")

    def load(self, settings) -> list[Sample]:  # noqa: ANN001
        data = Path(settings.data)
        return read_refer(data, settings.dataset, split=settings.split or "val", image_root=settings.image_root)

    def score(self, sample, prediction, context, model) -> dict[str, Any]:  # noqa: ANN001
        target = sample.target_mask()
        score = SegmentationMeter().add([m.astype(bool) for m in prediction.masks], target.astype(bool))
        return {
            "intersection": score.intersection,
            "union": score.union,
            "iou": score.iou,
            "empty_target": not target.any(),
            "empty_prediction": not any(m.any() for m in prediction.masks),
            "num_masks": len(prediction.masks),
        }

    def summarize(self, scores, samples) -> dict[str, Any]:  # noqa: ANN001
        state = {
            "combine": "union",
            "iou_sum": float(sum(s["iou"] for s in scores)),
            "intersection": sum(s["intersection"] for s in scores),
            "union": sum(s["union"] for s in scores),
            "count": len(scores),
            "empty_targets": sum(bool(s["empty_target"]) for s in scores),
            "empty_predictions": sum(bool(s["empty_prediction"]) for s in scores),
        }
        result = SegmentationMeter.from_state(state).result()
        result["missing_seg_rate"] = float(np.mean([s["num_masks"] == 0 for s in scores])) if scores else None
        return result
