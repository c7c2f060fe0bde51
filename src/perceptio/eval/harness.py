"""The evaluation runner behind ``perceptio eval``: exact metrics, resumable, shardable over torchrun ranks.

What a benchmark reads, asks and scores lives in its task module (:mod:`perceptio.eval.tasks`: ``refcoco``,
``hardblink``, ``blink``, ``mmbench``, ``depth``, ``vqa``; docs/evaluation.md has the details). This runner is the
same for every task: it batches the prompts, decodes, and writes every sample's line to ``predictions.jsonl`` as
soon as its batch is done; ``resume`` skips the samples already there, and the metrics are always recomputed from
the lines, so a resumed evaluation reports exactly what an uninterrupted one does. Under torchrun each rank takes
every ``world``-th sample and writes its own part; rank 0 merges them, so the sums behind cIoU are reduced over
ranks, never averages of ratios. Without torchrun, ``shard=(k, n)`` writes the same part in a process of one's own
(the quickstart evaluates on both cores so), and a later resumed run merges the parts and scores them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from perceptio.config import write_run_record
from perceptio.data.errors import DataError
from perceptio.data.schema import Sample
from perceptio.errors import UserError
from perceptio.eval.settings import EvalSettings
from perceptio.eval.tasks import TASKS, get_task
from perceptio.models.build import load_model
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.models.processing import PerceptioProcessor
from perceptio.utils.distributed import setup_distributed
from perceptio.utils.jsonl import read_jsonl
from perceptio.utils.run_folder import require_same_settings
from perceptio.utils.runlock import run_lock
from perceptio.utils.weights_files import weights_digest

__all__ = ["TASKS", "EvalSettings", "load_task_samples", "run_eval", "summarize"]

FEATURE_CACHE_BYTES = 64 * 2**20
"""The frozen SAM2 features an evaluation keeps (the most recent images: about 10 at 1,024 px, 60 at 64 px)."""

logger = logging.getLogger(__name__)


def load_task_samples(settings: EvalSettings) -> list[Sample]:
    """The samples of a task, in a stable order (``settings.limit``: the task's selection of that many)."""
    task = get_task(settings.task)
    samples = task.load(settings)
    return task.select(samples, settings.limit) if settings.limit is not None else samples


def summarize(task: str, records: list[dict[str, Any]], samples: list[Sample] | None = None) -> dict[str, Any]:
    """The task's metrics from ``predictions.jsonl`` records (one per sample)."""
    well_formed = float(np.mean([not r["issues"] for r in records])) if records else None
    result = get_task(task).summarize([r["score"] for r in records], samples)
    return {"task": task, "count": len(records), "well_formed_rate": well_formed, **result}


def run_eval(
    settings: EvalSettings,
    *,
    progress: bool = True,
    model: tuple[PerceptioForConditionalGeneration, PerceptioProcessor] | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Evaluate and write ``predictions.jsonl`` and ``metrics.json`` into ``settings.out``; returns the metrics.

    Args:
        settings: what to evaluate.
        progress: show a progress bar (main process).
        model: an already loaded model and processor (default: load ``settings.model``).
        shard: ``(k, n)``: predict only the ``k``-th of ``n`` blocks of consecutive samples, into
            ``predictions.rank{k}.jsonl``, and return ``{}`` without scoring; the ``n`` shards may run at the same
            time in processes of their own (their caller keeps other evaluations out of the folder: shards take no
            lock), and a later run with ``resume`` merges the parts and scores them. Needs ``settings.resume``; not
            under torchrun.

    Raises:
        RunFolderLockedError: another process evaluates (or trains) in ``settings.out``.
    """
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ValueError(f"shard (k, n) needs 0 <= k < n, got {shard}")
        if not settings.resume:
            raise ValueError("a shard adds to the predictions already there: it needs settings.resume")
        return _run_eval(settings, progress=progress, model=model, shard=shard)
    with run_lock(settings.out, "evaluation"):  # under torchrun: rank 0 holds it for the job
        return _run_eval(settings, progress=progress, model=model)


def _run_eval(
    settings: EvalSettings,
    *,
    progress: bool,
    model: tuple[PerceptioForConditionalGeneration, PerceptioProcessor] | None,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    ctx = setup_distributed(settings.device)
    rank, world = ctx.rank, ctx.world
    if shard is not None:
        if world > 1:
            raise ValueError("shard is for processes started without torchrun; under torchrun the ranks shard")
        rank, world = shard
    synchronise = ctx.world > 1  # ranks of one torchrun job wait for each other; shards do not
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_task_samples(settings)
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError("sample ids repeat; predictions could not be matched on resume", path=settings.data)
    device = str(ctx.device)  # under torchrun with GPUs: the GPU of this rank
    if model is None:
        loaded, processor = load_model(settings.model, device=device)
    else:
        loaded, processor = model
    settings = replace(  # the model's own decoding settings where the run does not override them
        settings,
        spatial_cot=loaded.config.spatial_cot if settings.spatial_cot is None else settings.spatial_cot,
        constrain=loaded.config.constrain if settings.constrain is None else settings.constrain,
    )
    final_path = out / "predictions.jsonl"
    part_path = out / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    protocol = _protocol(settings)
    settings_path = out / "eval_settings.json"
    if rank == 0:
        if settings.resume and settings_path.is_file():
            saved = json.loads(settings_path.read_text())
            # what this version records (older extras aside); a setting added since has the value it then had
            recorded = {key: saved.get(key, _ADDED_SINCE.get(key)) for key in protocol}
            require_same_settings(out, recorded, protocol, fix="Use the original settings or another --out")
        if not settings.resume:
            for stale in [final_path, *out.glob("predictions.rank*.jsonl")]:
                stale.unlink(missing_ok=True)
        settings_path.write_text(json.dumps(protocol, indent=2) + "\n")
    if synchronise:
        dist.barrier()  # stale files are gone before any rank reads or appends
    if settings.resume and part_path.is_file():  # drop a line cut short by a kill before appending
        part_path.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(part_path)))
    if synchronise:
        dist.barrier()
    # a shard reads only its own part: the others' are being written at the same time, and hold other samples
    parts = [part_path] if shard is not None else list(out.glob("predictions.rank*.jsonl"))
    done = {r["id"] for path in [final_path, *parts] for r in read_jsonl(path)}
    if shard is None:
        mine = [s for k, s in enumerate(samples) if k % world == rank and s.sample_id not in done]
    else:  # a block of consecutive samples: they often share an image, which SAM2 then encodes once
        block = samples[rank * len(samples) // world : (rank + 1) * len(samples) // world]
        mine = [s for s in block if s.sample_id not in done]
    task = get_task(settings.task)
    context = task.prepare(loaded, mine) if mine else None
    shown = progress and (rank == 0 or shard is not None)  # a shard's bar goes to its own log
    bar = tqdm(total=len(mine), desc=f"eval {settings.task}", disable=not shown)
    # consecutive samples often share an image (several expressions each): SAM2 encodes it once (the same masks)
    with part_path.open("a") as handle, loaded.frozen_features_cached(FEATURE_CACHE_BYTES):
        for start in range(0, len(mine), settings.batch_size):
            chunk = mine[start : start + settings.batch_size]
            images = [s.image.load() for s in chunk]
            prompts = [task.prompt(s) for s in chunk]
            predictions = loaded.predict(
                images,
                prompts,
                processor,
                spatial_cot=settings.spatial_cot,
                constrain=settings.constrain,
                require_depth_span=task.require_span(settings),
                batch_size=settings.batch_size,
                span_window=settings.span_window,
                compile=settings.compile,
                first_mask=settings.first_mask,
            )
            for sample, prompt, prediction in zip(chunk, prompts, predictions, strict=True):
                line = {
                    "id": sample.sample_id,
                    "prompt": prompt,
                    "output": prediction.text,
                    "answer": prediction.answer,
                    "issues": prediction.issues,
                    "score": task.score(sample, prediction, context, loaded),
                }
                handle.write(json.dumps(line) + "\n")
            handle.flush()
            bar.update(len(chunk))
    bar.close()
    if synchronise:
        dist.barrier()
    return _finish(settings, samples, out) if rank == 0 and shard is None else {}


class IncompleteEvaluationError(UserError, RuntimeError):
    """Some samples have no prediction line (a rank failed); ``--resume`` completes them."""


_ADDED_SINCE = {"first_mask": False}
"""Protocol settings that older evaluations did not record, with what they did then: they resume as such."""


def _protocol(settings: EvalSettings) -> dict[str, Any]:
    """What must not change between an evaluation and its resumption. The model is identified by its weights, not
    its path: a model retrained into the same folder must not merge its predictions with the old model's."""
    return {
        "task": settings.task,
        "weights": weights_digest(settings.model),
        "data": str(Path(settings.data).resolve()),
        "split": settings.split,
        **{name: getattr(settings, name) for name in get_task(settings.task).options},
        "spatial_cot": settings.spatial_cot,
        "constrained_decoding": settings.constrain,
    }


def _finish(settings: EvalSettings, samples: list[Sample], out: Path) -> dict[str, Any]:
    """Merge rank parts into ``predictions.jsonl`` (sample order), score, write ``metrics.json`` (and exports)."""
    paths = [out / "predictions.jsonl", *out.glob("predictions.rank*.jsonl")]
    lines = {r["id"]: r for path in paths for r in read_jsonl(path)}
    ordered = [lines[s.sample_id] for s in samples if s.sample_id in lines]
    current = {s.sample_id for s in samples}
    others = [r for key, r in lines.items() if key not in current]  # e.g. past --limit: kept, not scored
    tmp = out / "predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered + others))
    tmp.replace(out / "predictions.jsonl")
    for part in out.glob("predictions.rank*.jsonl"):
        part.unlink()
    missing = len(samples) - len(ordered)
    if missing:
        raise IncompleteEvaluationError(f"{missing} samples have no prediction; run again with --resume")
    metrics = summarize(settings.task, ordered, samples)
    record = {
        "metrics": metrics,
        "protocol": {
            "task": settings.task,
            "split": settings.split,
            **{name: getattr(settings, name) for name in get_task(settings.task).options},
            "spatial_cot": settings.spatial_cot,
            "constrained_decoding": settings.constrain,
            "greedy": True,
            "span_window": settings.span_window,
            "limit": settings.limit,
            "batch_size": settings.batch_size,
        },
        "model": str(settings.model),
        "data": str(settings.data),
    }
    write_run_record(out, record)  # environment.json: versions and git revision (config.yaml: the settings)
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    get_task(settings.task).export(samples, ordered, out)
    return metrics
