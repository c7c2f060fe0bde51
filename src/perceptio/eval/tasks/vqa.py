"""Short-answer VQA (a conversation JSON, first turn): exact match of the normalised answer, per category."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perceptio.data.readers import read_conversations
from perceptio.data.schema import Sample
from perceptio.eval.extract import normalize_answer
from perceptio.eval.tasks.base import EvalTask, register


@register
class VQA(EvalTask):
    name = "vqa"
    data_help = "a conversation JSON (LLaVA layout; the first turn is asked), e.g. a synthetic world's vqa/val.json"

    def load(self, settings) -> list[Sample]:  # noqa: ANN001
        data = Path(settings.data)
        return [s for s in read_conversations(data, image_root=settings.image_root, split=settings.split) if s.answer]

    def score(self, sample, prediction, context, model) -> dict[str, Any]:  # noqa: ANN001
        return {
            "gold": sample.answer,
            "correct": normalize_answer(prediction.answer) == normalize_answer(sample.answer),
            "category": sample.meta.get("category"),
        }

    def summarize(self, scores, samples) -> dict[str, Any]:  # noqa: ANN001
        by_category: dict[str, list[bool]] = {}
        for s in scores:
            by_category.setdefault(s.get("category") or "unknown", []).append(bool(s["correct"]))
        return {
            "accuracy": float(np.mean([s["correct"] for s in scores])) if scores else None,
            "by_category": {
                name: {"accuracy": float(np.mean(hits)), "count": len(hits)}
                for name, hits in sorted(by_category.items())
            },
        }
