"""Depth generation: the decoded depth span against the ground-truth map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceptio.data.readers import read_depth_folder
from perceptio.data.schema import Sample
from perceptio.eval.tasks.base import EvalTask, register
from perceptio.tokenizers.depth.evaluate import depth_metrics
from perceptio.tokenizers.depth.teachers import GroundTruthTeacher, teacher_maps

_METRICS = ("abs_rel", "rmse", "delta1")


@register
class Depth(EvalTask):
    """AbsRel, RMSE and delta < 1.25 of the decoded depth span against the ground-truth map, both in the depth
    tokenizer's normalised convention at its input size. A missing span scores as a flat map, so failures count
    against the model; the ``*_decoded`` metrics average the decoded spans alone."""

    name = "depth"
    data_help = "a depth folder with depth.json, or a synthetic world (with --split)"

    def load(self, settings) -> list[Sample]:  # noqa: ANN001
        data = Path(settings.data)
        if (data / "manifest.json").is_file():  # a synthetic world
            return read_depth_folder(data / "depth" / (settings.split or "val"), image_dir=data / "images")
        return read_depth_folder(data, image_dir=settings.image_root, split=settings.split)

    def require_span(self, settings) -> bool:  # noqa: ANN001
        return settings.spatial_cot  # the answer is the span (unless spatial tokens are banned, an ablation)

    def prepare(self, model, samples: list[Sample]) -> dict[str, np.ndarray]:  # noqa: ANN001
        """The ground-truth maps in the tokenizer's convention, by sample id."""
        size = model.config.depth_tokenizer.input_size
        maps, kept = teacher_maps(samples, GroundTruthTeacher(), size=size, progress=False)
        return {s.sample_id: m.depth for s, m in zip(kept, maps, strict=True)}

    def score(self, sample, prediction, context, model) -> dict[str, Any]:  # noqa: ANN001
        truth = context.get(sample.sample_id) if context is not None else None
        decoded = None
        if truth is not None and prediction.depth_codes is not None:
            codes = torch.from_numpy(prediction.depth_codes)[None].to(model.device)
            decoded = model.depth_tokenizer.decode(codes)[0].float().cpu().numpy()
        if truth is None:
            return {"decoded": decoded is not None}
        if decoded is None:  # no span: scored as a flat map, so failures count against the model
            return {"decoded": False, **depth_metrics(np.full_like(truth, 0.5), truth)}
        return {"decoded": True, **depth_metrics(decoded, truth)}

    def summarize(self, scores, samples) -> dict[str, Any]:  # noqa: ANN001
        decoded = [s for s in scores if s["decoded"]]
        scored = [s for s in scores if "abs_rel" in s]
        return {
            "decoded_rate": len(decoded) / len(scores) if scores else None,
            **{k: float(np.mean([s[k] for s in scored])) for k in _METRICS if scored},
            **{f"{k}_decoded": float(np.mean([s[k] for s in decoded])) for k in _METRICS if decoded},
        }
