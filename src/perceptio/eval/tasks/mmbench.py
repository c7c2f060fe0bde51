"""MMBench: CircularEval and single-pass accuracy, overall and per category, and a VLMEvalKit export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perceptio.data.errors import DataError
from perceptio.data.readers import read_mmbench
from perceptio.data.schema import Sample
from perceptio.eval.metrics import MMBenchRecord, score_mmbench
from perceptio.eval.tasks.base import EvalTask, letter_score, register

__all__ = ["MMBench", "export_vlmevalkit"]


@register
class MMBench(EvalTask):
    """Letters extracted deterministically (the option text counts too); ``vlmevalkit.tsv`` holds the predictions
    in the layout VLMEvalKit's evaluation reads."""

    name = "mmbench"
    data_help = "an MMBench .tsv with gold answers (a dev split)"

    def load(self, settings) -> list[Sample]:  # noqa: ANN001
        data = Path(settings.data)
        samples = read_mmbench(data)
        hidden = [s for s in samples if s.answer is None]
        if hidden:
            raise DataError(
                f"{len(hidden)} rows have no gold answer", path=data, fix="use a dev split (test answers are hidden)"
            )
        return samples

    def select(self, samples: list[Sample], limit: int) -> list[Sample]:
        """Whole questions: every circular copy of the first ``limit`` questions."""
        kept = set(list(dict.fromkeys(s.meta["g_index"] for s in samples))[:limit])
        return [s for s in samples if s.meta["g_index"] in kept]

    def score(self, sample, prediction, context, model) -> dict[str, Any]:  # noqa: ANN001
        return {
            **letter_score(sample, prediction.answer, choices=sample.choices),
            "index": sample.meta.get("index"),
            "category": sample.meta.get("category"),
            "l2_category": sample.meta.get("l2_category"),
        }

    def summarize(self, scores, samples) -> dict[str, Any]:  # noqa: ANN001
        records = [MMBenchRecord(s["index"], s["gold"], s["letter"], s["category"], s["l2_category"]) for s in scores]
        expected = [int(x.meta["index"]) for x in samples] if samples is not None else None
        return score_mmbench(records, expected_indices=expected)

    def export(self, samples: list[Sample], records: list[dict[str, Any]], out: Path) -> None:
        export_vlmevalkit(samples, records, out / "vlmevalkit.tsv")


def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("\t", " ").replace("\n", " ")


def export_vlmevalkit(samples: list[Sample], records: list[dict[str, Any]], path: Path) -> Path:
    """MMBench predictions as VLMEvalKit's evaluation reads them: the benchmark's columns plus ``prediction``."""
    by_id = {r["id"]: r for r in records}
    letters = "ABCDEFGHI"
    header = [
        "index",
        "question",
        "hint",
        *letters[: max(len(s.choices) for s in samples)],
        "answer",
        "category",
        "l2-category",
        "split",
        "prediction",
    ]
    rows = ["\t".join(header)]
    for sample in samples:
        record = by_id.get(sample.sample_id)
        if record is None:
            continue
        options = [sample.choices[k] if k < len(sample.choices) else "" for k in range(len(header) - 8)]
        rows.append(
            "\t".join(
                _cell(v)
                for v in [
                    sample.meta.get("index"),
                    sample.query,
                    sample.meta.get("hint"),
                    *options,
                    sample.answer,
                    sample.meta.get("category"),
                    sample.meta.get("l2_category"),
                    sample.meta.get("split"),
                    record["answer"],
                ]
            )
        )
    path.write_text("\n".join(rows) + "\n")
    return path
