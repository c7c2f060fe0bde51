"""What an evaluation task is: how it reads its benchmark, asks, scores one answer and sums up the scores.

The runner (:mod:`perceptio.eval.harness`) knows nothing of any task: it batches the prompts, writes one line per
sample to ``predictions.jsonl`` (the task's score fields under ``"score"``), resumes, merges the shards of a
torchrun job and calls :meth:`EvalTask.summarize` on the merged lines. A new benchmark is one module in this
package with an :class:`EvalTask` subclass decorated with :func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from perceptio.data.schema import Sample
from perceptio.data.templates import evaluation_query
from perceptio.errors import UserError

if TYPE_CHECKING:
    from perceptio.eval.settings import EvalSettings
    from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration, Prediction

__all__ = ["REGISTRY", "EvalTask", "UnknownTaskError", "get_task", "letter_score", "register"]


class EvalTask:
    """One benchmark. Subclasses set ``name`` and implement :meth:`load`, :meth:`score` and :meth:`summarize`.

    Attributes:
        name: the task's name on the command line (``perceptio eval NAME``).
        data_help: what ``--data`` points to, for the docs and errors.
        options: the settings besides data and split that change the samples (saved with the predictions, so
            that ``--resume`` refuses to mix runs with other values), e.g. ``("dataset",)`` for RefCOCO.
    """

    name: ClassVar[str]
    data_help: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()

    def load(self, settings: EvalSettings) -> list[Sample]:
        """Every sample of the benchmark split, in a stable order."""
        raise NotImplementedError

    def select(self, samples: list[Sample], limit: int) -> list[Sample]:
        """The samples ``--limit N`` keeps (default: the first N)."""
        return samples[:limit]

    def prompt(self, sample: Sample) -> str:
        """The question asked (default: the training templates' first phrasing)."""
        return evaluation_query(sample)

    def require_span(self, settings: EvalSettings) -> bool:
        """Make every answer open with a depth span (default: the model decides)."""
        return False

    def prepare(self, model: PerceptioForConditionalGeneration, samples: list[Sample]) -> Any:
        """Per-run context :meth:`score` needs (the depth task's reference maps); computed for the samples still
        to predict."""
        return None

    def score(
        self, sample: Sample, prediction: Prediction, context: Any, model: PerceptioForConditionalGeneration
    ) -> dict[str, Any]:
        """One sample's score fields (JSON values; saved in its ``predictions.jsonl`` line)."""
        raise NotImplementedError

    def summarize(self, scores: list[dict[str, Any]], samples: list[Sample] | None) -> dict[str, Any]:
        """The metrics from every sample's score fields (``samples``: the evaluated samples, in order)."""
        raise NotImplementedError

    def export(self, samples: list[Sample], records: list[dict[str, Any]], out: Path) -> None:
        """Write other formats next to ``metrics.json`` (default: none)."""


REGISTRY: dict[str, EvalTask] = {}


def register(cls: type[EvalTask]) -> type[EvalTask]:
    """Class decorator: make the task available to ``perceptio eval`` under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"two evaluation tasks are named {cls.name!r}")
    REGISTRY[cls.name] = cls()
    return cls


class UnknownTaskError(UserError, ValueError):
    """A task name no module registers."""


def get_task(name: str) -> EvalTask:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; choose one of {', '.join(REGISTRY)}") from None


def letter_score(sample: Sample, answer: str, *, choices: list[str] | None = None) -> dict[str, Any]:
    """The score fields of a lettered question: the extracted letter, how it was found, and whether it is right."""
    from perceptio.eval.extract import parse_answer

    parsed = parse_answer(answer, len(sample.letters), choices=choices)
    return {
        "letter": parsed.letter,
        "label": parsed.label,
        "rule": parsed.rule,
        "gold": sample.answer,
        "correct": parsed.letter is not None and parsed.letter == sample.answer,
        "num_options": len(sample.letters),
    }
