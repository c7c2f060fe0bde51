"""The benchmark harness behind ``perceptio eval``: exact metrics, resumable, shardable over torchrun ranks.

Tasks and what they score (docs/evaluation.md has the details):

* ``refcoco``: cIoU (intersection and union summed over the split) and gIoU; several predicted masks are OR-ed,
  no segmentation token is an empty mask, predictions are compared at the original image size.
* ``hardblink`` / ``blink``: letter accuracy per point count and their mean, with the deterministic extraction of
  :func:`perceptio.eval.extract.parse_answer` (unparsable and out-of-range answers are wrong); where the
  question carries its marker coordinates and the model wrote a depth span, also the "programmatic" accuracy
  read off the decoded depth map at the markers.
* ``mmbench``: CircularEval and single-pass accuracy, overall and per category; ``vlmevalkit.tsv`` exports the
  predictions in the layout VLMEvalKit reads.
* ``vqa``: exact match of the normalised short answer (conversation JSON, first turn).
* ``depth``: AbsRel, RMSE and delta < 1.25 of the decoded depth span against the ground-truth map, both in the
  tokenizer's normalised convention at its input size.

Every sample's line goes to ``predictions.jsonl`` as soon as its batch is done; ``resume`` skips the samples
already there, and the metrics are always recomputed from the lines, so a resumed evaluation reports exactly
what an uninterrupted one does. Under torchrun each rank takes every ``world``-th sample and writes its own
part; rank 0 merges them, so the sums behind cIoU are reduced over ranks, never averages of ratios.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from perceptio.config import write_run_record
from perceptio.data.errors import DataError
from perceptio.data.readers import (
    read_blink,
    read_conversations,
    read_depth_folder,
    read_hardblink,
    read_mmbench,
    read_refer,
)
from perceptio.data.schema import Sample
from perceptio.data.templates import render_sample
from perceptio.errors import UserError
from perceptio.eval.extract import normalize_answer, parse_answer
from perceptio.eval.metrics import MMBenchRecord, RelativeDepthMeter, SegmentationMeter, score_mmbench
from perceptio.models.build import load_model
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration, Prediction
from perceptio.models.processing import PerceptioProcessor
from perceptio.tokenizers.depth.evaluate import depth_metrics
from perceptio.tokenizers.depth.teachers import GroundTruthTeacher, teacher_maps
from perceptio.utils.jsonl import read_jsonl
from perceptio.utils.runlock import run_lock
from perceptio.utils.weights_files import weights_digest

__all__ = ["TASKS", "EvalSettings", "load_task_samples", "run_eval", "summarize"]

logger = logging.getLogger(__name__)

TASKS = ("refcoco", "hardblink", "blink", "mmbench", "depth", "vqa")
SEGMENT_PROMPT = "Please segment {expr} in this image."  # the LISA / Sa2VA evaluation prompt
DEPTH_PROMPT = "What is the depth map for the image?"


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation run.

    Attributes:
        task: one of :data:`TASKS`.
        model: the model folder.
        data: refcoco: the refer root (with ``refs(*).p``); hardblink: the folder with ``questions/``; blink: the
            parquet file or BLINK root; mmbench: the ``.tsv``; depth: a depth folder or a synthetic world.
        out: the output folder.
        split: the split (refcoco: val/testA/testB/test; blink: val/test; depth with a world: its split).
        dataset: refcoco, refcoco+ or refcocog (refcoco only).
        image_root: images, when not found next to the annotations.
        limit: only the first N samples (MMBench: the first N questions with all their circular copies;
            HardBLINK/BLINK: N questions spread evenly over the point counts).
        batch_size: prompts per generation batch.
        resume: keep the samples already in ``predictions.jsonl``.
        spatial_cot: let the model write spatial tokens (False: ban them and answer directly).
        constrain: constrain the depth-span grammar while decoding (the default, so every span is well-formed).
        span_window: depth-span tokens decoded per forward (exact parallel decoding; 1: one at a time).
        compile: ``torch.compile`` the decoding step (pays off over long evaluations).
        device: cpu or cuda (default: cuda when available).
    """

    task: str
    model: Path
    data: Path
    out: Path
    split: str | None = None
    dataset: str = "refcoco"
    image_root: Path | None = None
    limit: int | None = None
    batch_size: int = 8
    resume: bool = False
    spatial_cot: bool = True
    constrain: bool = True
    span_window: int = 16
    compile: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.batch_size < 1 or self.span_window < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("batch_size, span_window and limit must be at least 1")


def load_task_samples(settings: EvalSettings) -> list[Sample]:
    """The samples of a task, in a stable order."""
    task, data = settings.task, Path(settings.data)
    if task == "refcoco":
        samples = read_refer(data, settings.dataset, split=settings.split or "val", image_root=settings.image_root)
    elif task == "hardblink":
        samples = read_hardblink(data, split=settings.split)
    elif task == "blink":
        samples = [s for s in read_blink(data, split=settings.split or "val") if s.answer is not None]
        if not samples:
            raise DataError(
                "the BLINK split hides its answers", path=data, fix="evaluate on --split val (test answers are hidden)"
            )
    elif task == "mmbench":
        samples = read_mmbench(data)
        hidden = [s for s in samples if s.answer is None]
        if hidden:
            raise DataError(
                f"{len(hidden)} rows have no gold answer", path=data, fix="use a dev split (test answers are hidden)"
            )
    elif task == "vqa":
        samples = [
            s for s in read_conversations(data, image_root=settings.image_root, split=settings.split) if s.answer
        ]
    else:
        if (data / "manifest.json").is_file():  # a synthetic world
            samples = read_depth_folder(data / "depth" / (settings.split or "val"), image_dir=data / "images")
        else:
            samples = read_depth_folder(data, image_dir=settings.image_root, split=settings.split)
    if settings.limit is not None and task == "mmbench":  # whole questions: every circular copy of the first N
        kept = set(list(dict.fromkeys(s.meta["g_index"] for s in samples))[: settings.limit])
        return [s for s in samples if s.meta["g_index"] in kept]
    if settings.limit is not None and task in ("hardblink", "blink"):
        return balance_point_counts(samples, settings.limit)
    return samples[: settings.limit] if settings.limit is not None else samples


def balance_point_counts(samples: list[Sample], limit: int) -> list[Sample]:
    """At most ``limit`` questions taken round-robin over the point counts, in the original order within each
    count: the readers order questions by point count, so a plain prefix would drop whole counts."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:  # the count of lettered options: real HardBLINK has no marker coordinates, only letters
        groups.setdefault(len(sample.letters), []).append(sample)
    kept: set[int] = set()  # positions in ``samples``
    position = {id(sample): k for k, sample in enumerate(samples)}
    for rank in range(max(len(group) for group in groups.values()) if groups else 0):
        for _, group in sorted(groups.items()):
            if rank < len(group) and len(kept) < limit:
                kept.add(position[id(group[rank])])
    return [samples[k] for k in sorted(kept)]


def _prompt(task: str, sample: Sample, model: PerceptioForConditionalGeneration) -> str:
    if task == "refcoco":
        return SEGMENT_PROMPT.format(expr=sample.query)
    if task == "depth":
        return DEPTH_PROMPT
    if task == "vqa":
        return sample.query.replace("<image>", "").strip()
    if task == "mmbench":
        rng = np.random.default_rng(0)
        return render_sample(sample, model.config.vocab, rng, depth_cot=False).query
    return sample.query


def _programmatic(sample: Sample, prediction: Prediction) -> str | None:
    """The marker with the largest decoded value (1 = nearest) at its coordinates, when both are known."""
    if prediction.depth is None or not sample.points:
        return None
    h, w = prediction.depth.shape
    values = [prediction.depth[min(h - 1, max(0, int(p.y))), min(w - 1, max(0, int(p.x)))] for p in sample.points]
    return sample.points[int(np.argmax(values))].label


def _score(
    task: str, sample: Sample, prediction: Prediction, truth: np.ndarray | None, decoded: np.ndarray | None
) -> dict[str, Any]:
    """One sample's score fields (``truth``/``decoded``: the depth task's normalised maps at the tokenizer size)."""
    if task == "refcoco":
        target = sample.target_mask()
        meter = SegmentationMeter()
        score = meter.add([m.astype(bool) for m in prediction.masks], target.astype(bool))
        return {
            "intersection": score.intersection,
            "union": score.union,
            "iou": score.iou,
            "empty_target": not target.any(),
            "empty_prediction": not any(m.any() for m in prediction.masks),
            "num_masks": len(prediction.masks),
        }
    if task in ("hardblink", "blink", "mmbench"):
        letters = sample.letters
        parsed = parse_answer(prediction.answer, len(letters), choices=sample.choices if task == "mmbench" else None)
        out: dict[str, Any] = {
            "letter": parsed.letter,
            "label": parsed.label,
            "rule": parsed.rule,
            "gold": sample.answer,
            "correct": parsed.letter is not None and parsed.letter == sample.answer,
            "num_options": len(letters),
        }
        if task == "mmbench":
            out.update(
                index=sample.meta.get("index"),
                category=sample.meta.get("category"),
                l2_category=sample.meta.get("l2_category"),
            )
        else:
            programmatic = _programmatic(sample, prediction)
            out.update(
                point_count=len(letters),
                programmatic=programmatic,
                programmatic_correct=None if programmatic is None else programmatic == sample.answer,
            )
        return out
    if task == "vqa":
        return {
            "gold": sample.answer,
            "correct": normalize_answer(prediction.answer) == normalize_answer(sample.answer),
            "category": sample.meta.get("category"),
        }
    if truth is None:
        return {"decoded": decoded is not None}
    if decoded is None:  # no span: scored as a flat map, so failures count against the model
        return {"decoded": False, **depth_metrics(np.full_like(truth, 0.5), truth)}
    return {"decoded": True, **depth_metrics(decoded, truth)}


def summarize(task: str, records: list[dict[str, Any]], samples: list[Sample] | None = None) -> dict[str, Any]:
    """The task's metrics from ``predictions.jsonl`` records (one per sample)."""
    scores = [r["score"] for r in records]
    well_formed = float(np.mean([not r["issues"] for r in records])) if records else None
    if task == "refcoco":
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
    elif task in ("hardblink", "blink"):
        answers, programmatic = RelativeDepthMeter(), RelativeDepthMeter()
        for s in scores:
            answers.add(s["point_count"], bool(s["correct"]), parsed=s["letter"] is not None)
            if s["programmatic"] is not None:
                programmatic.add(s["point_count"], bool(s["programmatic_correct"]))
        result = {
            "answer": answers.result(),
            "programmatic": programmatic.result() if programmatic.point_counts else None,
        }
        result["unparsed_rate"] = float(np.mean([s["letter"] is None for s in scores])) if scores else None
        # does the written letter follow from the model's own span? (questions whose span could be read)
        read = [s for s in scores if s["programmatic"] is not None]
        agree = [s["letter"] == s["programmatic"] for s in read]
        result["letter_span_agreement"] = float(np.mean(agree)) if read else None
        result["span_read_rate"] = len(read) / len(scores) if scores else None
    elif task == "mmbench":
        mm = [MMBenchRecord(s["index"], s["gold"], s["letter"], s["category"], s["l2_category"]) for s in scores]
        expected = [int(x.meta["index"]) for x in samples] if samples is not None else None
        result = score_mmbench(mm, expected_indices=expected)
    elif task == "vqa":
        by_category: dict[str, list[bool]] = {}
        for s in scores:
            by_category.setdefault(s.get("category") or "unknown", []).append(bool(s["correct"]))
        result = {
            "accuracy": float(np.mean([s["correct"] for s in scores])) if scores else None,
            "by_category": {
                name: {"accuracy": float(np.mean(hits)), "count": len(hits)}
                for name, hits in sorted(by_category.items())
            },
        }
    else:
        decoded = [s for s in scores if s["decoded"]]
        scored = [s for s in scores if "abs_rel" in s]
        result = {
            "decoded_rate": len(decoded) / len(scores) if scores else None,
            # every sample (a missing span scores as a flat map), then the decoded spans alone
            **{k: float(np.mean([s[k] for s in scored])) for k in ("abs_rel", "rmse", "delta1") if scored},
            **{
                f"{k}_decoded": float(np.mean([s[k] for s in decoded]))
                for k in ("abs_rel", "rmse", "delta1")
                if decoded
            },
        }
    return {"task": task, "count": len(records), "well_formed_rate": well_formed, **result}


def _depth_reference(model: PerceptioForConditionalGeneration, samples: list[Sample]) -> dict[str, np.ndarray]:
    size = model.config.depth_tokenizer.input_size
    maps, kept = teacher_maps(samples, GroundTruthTeacher(), size=size, progress=False)
    return {s.sample_id: m.depth for s, m in zip(kept, maps, strict=True)}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_eval(
    settings: EvalSettings,
    *,
    progress: bool = True,
    model: tuple[PerceptioForConditionalGeneration, PerceptioProcessor] | None = None,
) -> dict[str, Any]:
    """Evaluate and write ``predictions.jsonl`` and ``metrics.json`` into ``settings.out``; returns the metrics.

    Args:
        settings: what to evaluate.
        progress: show a progress bar (main process).
        model: an already loaded model and processor (default: load ``settings.model``).

    Raises:
        RunFolderLockedError: another process evaluates (or trains) in ``settings.out``.
    """
    with run_lock(settings.out, "evaluation"):  # under torchrun: rank 0 holds it for the job
        return _run_eval(settings, progress=progress, model=model)


def _run_eval(
    settings: EvalSettings,
    *,
    progress: bool,
    model: tuple[PerceptioForConditionalGeneration, PerceptioProcessor] | None,
) -> dict[str, Any]:
    rank, world = _world()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_task_samples(settings)
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError("sample ids repeat; predictions could not be matched on resume", path=settings.data)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:  # one GPU per rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if model is None:
        loaded, processor = load_model(settings.model, device=device)
    else:
        loaded, processor = model
    final_path = out / "predictions.jsonl"
    part_path = out / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    protocol = _protocol(settings)
    settings_path = out / "eval_settings.json"
    if rank == 0:
        if settings.resume and settings_path.is_file():
            saved = json.loads(settings_path.read_text())
            differ = {k: (saved.get(k), v) for k, v in protocol.items() if saved.get(k) != v}
            if differ:
                raise ValueError(
                    f"{out}: cannot resume predictions made with other settings "
                    f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in differ.items())}); "
                    "use the original settings or another --out"
                )
        if not settings.resume:
            for stale in [final_path, *out.glob("predictions.rank*.jsonl")]:
                stale.unlink(missing_ok=True)
        settings_path.write_text(json.dumps(protocol, indent=2) + "\n")
    if world > 1:
        dist.barrier()  # stale files are gone before any rank reads or appends
    if settings.resume and part_path.is_file():  # drop a line cut short by a kill before appending
        part_path.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(part_path)))
    if world > 1:
        dist.barrier()
    done = {r["id"] for path in [final_path, *out.glob("predictions.rank*.jsonl")] for r in read_jsonl(path)}
    mine = [s for k, s in enumerate(samples) if k % world == rank and s.sample_id not in done]
    reference = _depth_reference(loaded, mine) if settings.task == "depth" and mine else None
    require_span = settings.task == "depth" and settings.spatial_cot
    bar = tqdm(total=len(mine), desc=f"eval {settings.task}", disable=not (progress and rank == 0))
    with part_path.open("a") as handle:
        for start in range(0, len(mine), settings.batch_size):
            chunk = mine[start : start + settings.batch_size]
            images = [s.image.load() for s in chunk]
            prompts = [_prompt(settings.task, s, loaded) for s in chunk]
            predictions = loaded.predict(
                images,
                prompts,
                processor,
                spatial=settings.spatial_cot,
                constrain=settings.constrain,
                require_depth_span=require_span,
                batch_size=settings.batch_size,
                span_window=settings.span_window,
                compile=settings.compile,
            )
            for sample, prompt, prediction in zip(chunk, prompts, predictions, strict=True):
                truth = decoded = None
                if reference is not None:
                    truth = reference.get(sample.sample_id)
                    if prediction.depth_codes is not None:
                        codes = torch.from_numpy(prediction.depth_codes)[None].to(loaded.device)
                        decoded = loaded.depth_tokenizer.decode(codes)[0].float().cpu().numpy()
                line = {
                    "id": sample.sample_id,
                    "prompt": prompt,
                    "output": prediction.text,
                    "answer": prediction.answer,
                    "issues": prediction.issues,
                    "score": _score(settings.task, sample, prediction, truth, decoded),
                }
                handle.write(json.dumps(line) + "\n")
            handle.flush()
            bar.update(len(chunk))
    bar.close()
    if world > 1:
        dist.barrier()
    return _finish(settings, samples, out) if rank == 0 else {}


class IncompleteEvaluationError(UserError, RuntimeError):
    """Some samples have no prediction line (a rank failed); ``--resume`` completes them."""


def _protocol(settings: EvalSettings) -> dict[str, Any]:
    """What must not change between an evaluation and its resumption. The model is identified by its weights, not
    its path: a model retrained into the same folder must not merge its predictions with the old model's."""
    return {
        "task": settings.task,
        "weights": weights_digest(settings.model),
        "data": str(Path(settings.data).resolve()),
        "split": settings.split,
        "dataset": settings.dataset if settings.task == "refcoco" else None,
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
            "dataset": settings.dataset if settings.task == "refcoco" else None,
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
    if settings.task == "mmbench":
        export_vlmevalkit(samples, ordered, out / "vlmevalkit.tsv")
    return metrics


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
