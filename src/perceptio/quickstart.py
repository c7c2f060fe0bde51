"""The main job, end to end on a CPU: ``perceptio quickstart`` (``make quickstart``).

Stages, each written under ``out`` and reused by a second run once finished:

1. ``world/``: render the synthetic world (train/val/test);
2. ``tokenizer/`` and ``segmenter/``, only when training from random weights (``--from-scratch``): train the tiny
   depth tokenizer on the train split's exact depth, and pretrain the tiny SAM2 with point and box prompts on its
   object masks. The default base (``tiny-base``) brings both, pretrained on another world, as the paper's model
   starts from a pretrained SAM2 and depth tokenizer;
3. ``baseline/``: the FiLM CNN trained on the world's VQA alone (the report's "how hard is the data" row), beside
   training (or beside SAM2 from random weights): one core each;
4. ``train/``: train the tiny Perceptio model with the recipe (``configs/tiny_synth.yaml``), resumable;
5. ``eval/``: evaluate on the val split (the depth-span grammar constrained; the span tasks a second time without
   it): referring segmentation (cIoU, gIoU of each answer's first mask, and the pretrained SAM2 prompted with a
   true point inside each object), relative depth with 2-5 markers (against the
   majority-answer baseline per point count), depth (AbsRel, delta<1.25 of the decoded span, against the mean
   training map), VQA accuracy, and the share of well-formed spatial spans;
6. ``predictions/``: predictions on a few val images (the files ``perceptio predict`` writes);
7. ``report.md``, ``loss_curves.png`` and ``gallery.png``.

``stages.json`` records each stage's settings digest (chained through the earlier stages) and whether it
finished. Changing a setting reruns that stage and every later one from an empty folder; an interrupted
tokenizer, training or evaluation stage with unchanged settings resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from perceptio.pipeline import (
    Concurrent,
    Job,
    Stage,
    base_fingerprint,
    check_limits,
    last_line,
    run_jobs,
    run_stages,
    sam2_stage,
    stage_records,
    tokenizer_stage,
    train_stage,
    without_resume,
    world_eval_settings,
    world_stage,
)

__all__ = ["QuickstartConfig", "TARGETS", "export_quickstart_model", "quickstart_stages", "run_quickstart"]

STAGES = ("world", "tokenizer", "segmenter", "baseline", "train", "eval", "predictions", "report")
"""Every stage, in order. ``tokenizer`` and ``segmenter`` run only without a base (:func:`quickstart_stages`)."""
EVAL_TASKS = ("refcoco", "hardblink", "depth", "vqa")
SPAN_TASKS = ("hardblink", "depth")
"""Tasks whose answers follow a depth span: evaluated a second time with unconstrained decoding."""


@dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart runs. The defaults are the documented ``make quickstart``; tests shrink every stage.

    Each field's ``help`` and limits (``min``) are the ``perceptio quickstart`` option's, and are checked here too.
    The recipe's data root, tokenizer, segmenter and output folder are pointed at ``out``; ``eval_limit`` None
    evaluates the whole val split; each gallery image gets a segmentation, a depth and a question prompt; the
    baseline (the report's "how hard is the data" row) is the FiLM CNN of :mod:`perceptio.baselines` trained on the
    VQA split alone; ``base`` None trains Perceptio from random weights (``--from-scratch``)."""

    out: Path = field(default=Path("runs/quickstart"), metadata={"help": "Run folder."})
    recipe: Path = field(default=Path("configs/tiny_synth.yaml"), metadata={"help": "Training recipe."})
    overrides: tuple[str, ...] = field(
        default=(), metadata={"help": "key=value overrides of the training recipe, e.g. run.steps=300."}
    )
    num_images: int = field(default=4000, metadata={"help": "Images in the synthetic world.", "min": 10})
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world."})
    image_size: int = field(default=128, metadata={"help": "Side of the world's square images, in pixels."})
    tokenizer_steps: int = field(
        default=1500,
        metadata={"help": "Depth-tokenizer training steps (without a base; a base brings its own).", "min": 1},
    )
    segmenter_steps: int = field(
        default=1500, metadata={"help": "SAM2 pretraining steps (without a base; a base brings its own).", "min": 1}
    )
    segmenter_batch_size: int = field(default=32, metadata={"help": "SAM2 pretraining batch size.", "min": 1})
    eval_limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N samples of each task.", "min": 1}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per evaluation batch.", "min": 1})
    gallery: int = field(default=4, metadata={"help": "Val images in the report's gallery.", "min": 0})
    baseline_steps: int = field(
        default=1000,
        metadata={"help": "Steps of the FiLM CNN VQA baseline shown in the report (0: skip it).", "min": 0},
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    base: Path | None = field(
        default_factory=lambda: _default_base(),
        metadata={"help": "The pretrained base to fine-tune from (default: the shipped tiny base)."},
    )

    def __post_init__(self) -> None:
        check_limits(self)


def _default_base() -> Path | None:
    from perceptio.weights import shipped

    try:
        return shipped("tiny-base")
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Target:
    """One acceptance target of the quickstart model (the issue's list), checked against ``metrics``."""

    name: str
    describe: str
    check: Callable[[dict[str, Any]], tuple[str, bool | None]]


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _seg_target(m: dict[str, Any]) -> tuple[str, bool | None]:
    ciou, ref = m["refcoco"].get("ciou"), m["reference"]["point_prompt_ciou"]
    if ciou is None:
        return "n/a", None
    share = ciou / ref if ref else float("nan")
    return f"cIoU {ciou:.3f}; {_fmt(share, True)} of point-prompted {ref:.3f}", bool(share >= 0.7)


def _span_target(m: dict[str, Any]) -> tuple[str, bool | None]:
    rate = m["well_formed_rate"]
    return _fmt(rate, True), None if rate is None else bool(rate >= 1.0)


def _depth_target(m: dict[str, Any]) -> tuple[str, bool | None]:
    ours, base = m["depth"].get("abs_rel"), m["reference"]["mean_map_abs_rel"]
    if ours is None:
        return "n/a", None
    return f"AbsRel {ours:.3f} vs mean map {base:.3f}", bool(ours <= 0.75 * base)  # "well below": >= 25 % lower


def _vqa_target(m: dict[str, Any]) -> tuple[str, bool | None]:
    acc = m["vqa"].get("accuracy")
    if acc is None:
        return "n/a", None
    parts, ok = [f"overall {_fmt(acc, True)}"], acc >= 0.7
    priors = m["reference"].get("vqa_prior_by_category", {})
    for name, entry in m["vqa"].get("by_category", {}).items():
        prior = priors.get(name)
        parts.append(f"{name} {_fmt(entry['accuracy'], True)} vs prior {_fmt(prior, True)}")
        ok &= prior is not None and entry["accuracy"] >= prior + 0.15
    return "; ".join(parts), bool(ok)


def _point_accuracy(m: dict[str, Any], points: int | str) -> float | None:
    return m["hardblink"]["answer"]["by_point_count"].get(str(points), {}).get("accuracy")


def _relative_target(m: dict[str, Any]) -> tuple[str, bool | None]:
    base = m["reference"]["majority_by_points"]
    if not base:
        return "no relative-depth questions", None
    parts, ok = [], True
    for n in sorted(base, key=int):
        acc = _point_accuracy(m, n)
        parts.append(f"{n} pts {_fmt(acc, True)} vs {_fmt(base[n], True)}")
        ok &= acc is not None and acc >= base[n] + 0.15
    agreement = m["hardblink"].get("letter_span_agreement")
    parts.append(f"letter agrees with its own span {_fmt(agreement, True)}")
    ok &= agreement is not None and agreement >= 0.9
    return "; ".join(parts), bool(ok)


def _image_use_target(m: dict[str, Any]) -> tuple[str, bool | None]:
    gaps = {name: entry["gap"] for name, entry in (m.get("image_use") or {}).items()}
    if not gaps:
        return "n/a", None
    return "; ".join(f"{name} {gap:+.3f}" for name, gap in gaps.items()), all(g > 0 for g in gaps.values())


TARGETS = (
    Target("referring segmentation", "cIoU >= 70 % of the point-prompted SAM2", _seg_target),
    Target("spatial spans", "100 % well-formed (unconstrained decoding)", _span_target),
    Target("depth", "decoded-span AbsRel well below (<= 0.75x) the mean-map baseline", _depth_target),
    Target("VQA", "accuracy >= 70 %; every category >= its answer prior + 15 pts", _vqa_target),
    Target(
        "relative depth",
        ">= the majority answer + 15 pts for every point count; the letter agrees with the model's own span on >= 90 %",
        _relative_target,
    ),
    Target(
        "image use", "val loss with shuffled images minus with the right ones > 0 for every task", _image_use_target
    ),
)


def run_quickstart(config: QuickstartConfig, *, echo: Callable[[str], None] = print, until: str = STAGES[-1]) -> Path:
    """Run (or resume) every stage up to ``until`` (default: all); returns the path of ``report.md``.

    Raises ``RunFolderLockedError`` at once when another process runs a quickstart in ``config.out``."""
    from perceptio.utils.runlock import run_lock

    with run_lock(config.out, "quickstart"):  # its stages lock their own sub-folders too
        return _run_quickstart(config, echo=echo, until=until)


def quickstart_stages(config: QuickstartConfig) -> tuple[str, ...]:
    """The stages ``config`` runs, in order: a base brings its own depth tokenizer and SAM2, so only a run from
    random weights (``base`` None) trains them on the world first."""
    return STAGES if config.base is None else tuple(s for s in STAGES if s not in ("tokenizer", "segmenter"))


def _paths(out: Path) -> dict[str, Path]:
    return {name: out / name for name in STAGES[:-1]}


def _run_quickstart(config: QuickstartConfig, *, echo: Callable[[str], None], until: str) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _paths(out)
    world = paths["world"]
    recipe = _recipe(config, paths)
    baseline = Stage(
        "baseline",
        (config.baseline_steps, asdict(_baseline_config(config))),
        without_resume(_baseline, config, paths),
        folder=paths["baseline"],
    )
    # no quick evaluations while training (the eval stage evaluates the model in full): they change nothing in the
    # weights (the same bytes with and without them) and cost about 10 s
    quiet = replace(recipe, eval=replace(recipe.eval, datasets={}))
    train = train_stage(quiet, base_fingerprint(config.base), progress=config.progress)
    if config.base is None:  # no pretrained parts: the depth tokenizer and SAM2 are trained on the world first
        # the tokenizer trains 1.2x faster on two threads than on one: it runs first, on both cores; SAM2 (no faster
        # on two threads) and the baseline then run side by side, one core each
        upstream: list[Stage | Concurrent] = [
            tokenizer_stage(world, paths["tokenizer"], steps=config.tokenizer_steps, progress=config.progress),
            Concurrent(
                (
                    sam2_stage(
                        world,
                        paths["segmenter"],
                        steps=config.segmenter_steps,
                        batch_size=config.segmenter_batch_size,
                        progress=config.progress,
                    ),
                    baseline,
                )
            ),
            train,
        ]
    else:  # the base brings its SAM2 and depth tokenizer, as the paper's model starts from pretrained ones.
        # Training runs on one thread (its data worker takes a little of the other core): the baseline fills the
        # other core, at a lower priority, so that it takes only what training leaves (it ends well before)
        upstream = [Concurrent((replace(baseline, nice=10), train))]
    stages = [
        world_stage(
            world,
            num_images=config.num_images,
            seed=config.world_seed,
            image_size=config.image_size,
            progress=config.progress,
        ),
        *upstream,
        Stage(
            "eval",
            (config.eval_limit, EVAL_TASKS, SPAN_TASKS, "refcoco: first mask"),
            lambda resume: _evaluate(config, paths, echo),  # the harness keeps finished predictions when it resumes
            folder=paths["eval"],
            resumable=True,
        ),
        Stage(
            "predictions", (config.gallery,), lambda resume: _predictions(config, paths), folder=paths["predictions"]
        ),
        Stage("report", (time.time(),), lambda resume: _report(config, paths)),  # always rewritten: it is cheap
    ]
    began = time.perf_counter()
    run_stages(stages, out / "stages.json", echo=echo, until=until)
    echo(f"finished in {time.perf_counter() - began:.0f} s (this run)")
    return out / "report.md"


def _targets_table(summary: dict[str, Any]) -> list[str]:
    """The Markdown table of :data:`TARGETS` checked against ``summary`` (the report's and the model card's)."""
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for target in TARGETS:
        value, met = target.check(summary)
        verdict = "n/a" if met is None else "yes" if met else "no"
        lines.append(f"| {target.name} | {value} | {target.describe} | {verdict} |")
    return lines


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (model cards travel between machines)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def export_quickstart_model(config: QuickstartConfig, dest: str | Path, *, command: str | None = None) -> Path:
    """Copy a finished quickstart's model to ``dest`` with a model card (what made it, its targets table and its
    image-use gaps, from ``report.md``'s figures) and ``SHA256SUMS``: how ``tiny-perceptio`` is shipped."""
    from perceptio.weights import export_model

    out = Path(config.out)
    records = stage_records(out / "stages.json")
    if records.get("report", {}).get("status") != "done":
        raise FileNotFoundError(f"{out} holds no finished quickstart (stages.json has no finished report stage)")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    recipe = _recipe(config, _paths(out))
    lines = [
        "# Perceptio tiny model (quickstart)",
        "",
        "A `tiny` Perceptio model trained on the synthetic world by `perceptio quickstart`: it writes a segmentation "
        "token, a depth span and an answer, like the paper's model, at a size that runs on a CPU. It is the default "
        "model of `perceptio predict`, `perceptio eval` and `Perceptio.from_pretrained()` with no path.",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command or 'perceptio quickstart'}` |",
        f"| started from | {f'the pretrained base `{_shown(config.base)}`' if config.base else 'random weights'} |",
        f"| recipe | `{config.recipe}` {' '.join(config.overrides)} |",
        f"| world | {config.num_images} images, seed {config.world_seed}, {config.image_size} px |",
        f"| steps | {recipe.run.steps} of batch {recipe.run.global_batch_size}, seed {recipe.run.seed} |",
        *[f"| wall time, {name} | {r['seconds']} s |" for name, r in records.items() if "seconds" in r],
        "",
        "## Targets (val split)",
        "",
        *_targets_table(summary),
    ]
    return export_model(out / "train" / "model", dest, lines)


# --------------------------------------------------------------------------------------------------- stages


def _baseline_config(config: QuickstartConfig):  # noqa: ANN202 - FilmBaselineConfig
    from perceptio.baselines import FilmBaselineConfig

    return FilmBaselineConfig(steps=max(1, config.baseline_steps), threads=1)  # it runs beside SAM2


def _baseline(config: QuickstartConfig, paths: dict[str, Path]) -> None:
    """The FiLM CNN trained on the world's VQA alone: ``baseline/film_vqa.json`` (or a note that it was skipped)."""
    from perceptio.baselines import train_film_baseline

    out = paths["baseline"]
    out.mkdir(parents=True, exist_ok=True)
    if config.baseline_steps == 0:
        result: dict[str, Any] = {"skipped": True}
    else:
        result = train_film_baseline(paths["world"], _baseline_config(config), progress=config.progress)
    (out / "film_vqa.json").write_text(json.dumps(result, indent=2) + "\n")


def _recipe(config: QuickstartConfig, paths: dict[str, Path]):  # noqa: ANN202 - TrainConfig
    from perceptio.config import load_config
    from perceptio.train.config import TrainConfig

    pointed = [f"data.root={paths['world']}", f"run.out_dir={paths['train']}"]
    if config.base is None:  # random weights: the depth tokenizer and SAM2 the quickstart trained first
        pointed += [f"model.depth_tokenizer={paths['tokenizer']}", f"model.segmenter_weights={paths['segmenter']}"]
    else:  # fine-tune from the pretrained base (with its SAM2 and depth tokenizer), as the paper from InternVL
        pointed += ["model.preset=null", f"model.init={config.base}", "model.depth_tokenizer=null"]
        pointed += ["model.segmenter_weights=null"]
    return load_config(TrainConfig, config.recipe, pointed + list(config.overrides))


def _eval_settings(  # noqa: ANN202 - EvalSettings
    config: QuickstartConfig, paths: dict[str, Path], task: str, *, constrain: bool
):
    """The val-split evaluation of the trained model on ``task`` (into ``<task>_unconstrained`` without the
    depth-span grammar)."""
    return world_eval_settings(
        paths["world"],
        task,
        "val",
        model=paths["train"] / "model",
        out=paths["eval"] / (task if constrain else f"{task}_unconstrained"),
        limit=config.eval_limit,
        batch_size=config.eval_batch_size,
        constrain=constrain,
        first_mask=task == "refcoco",  # the answers open with their segmentation token: no need to write the rest
    )


EVALUATIONS = [(task, True) for task in EVAL_TASKS] + [(task, False) for task in SPAN_TASKS]
"""Every (task, constrained decoding) of the quickstart's evaluation."""


def _evaluate(config: QuickstartConfig, paths: dict[str, Path], echo: Callable[[str], None] = print) -> None:
    from perceptio.eval.harness import run_eval
    from perceptio.models.build import load_model

    shards = os.cpu_count() or 1
    if shards > 1:  # each core predicts a block of every task's samples; below, the parts are merged and scored
        logs = paths["eval"].parent / "logs"
        jobs = [
            Job(
                f"eval, part {k + 1} of {shards}",
                partial(_evaluate_shard, config, paths, (k, shards)),
                logs / f"eval-{k + 1}.log",
                None,
                progress=partial(last_line, logs / f"eval-{k + 1}.log"),
            )
            for k in range(shards)
        ]
        run_jobs(jobs, shards, echo=echo, bars=True)
    model = load_model(paths["train"] / "model", device="cpu")
    metrics: dict[str, Any] = {}
    for task, constrain in EVALUATIONS:  # the library's default protocol is constrained (spans well-formed); the
        settings = _eval_settings(config, paths, task, constrain=constrain)  # unconstrained pass measures the model
        metrics[task if constrain else f"{task}_unconstrained"] = run_eval(
            settings, progress=config.progress, model=model
        )
    for name in EXTRAS:  # made by a shard, or here when there is none (or it was interrupted before)
        metrics[name] = _extra(config, paths, name, model)
    loose = [metrics[f"{t}_unconstrained"] for t in SPAN_TASKS if metrics[f"{t}_unconstrained"]["count"]]
    total = sum(m["count"] for m in loose)
    metrics["well_formed_rate"] = sum(m["well_formed_rate"] * m["count"] for m in loose) / total if total else None
    (paths["eval"] / "summary.json").write_text(json.dumps(metrics, indent=2) + "\n")


EXTRAS = ("reference", "image_use")
"""The summary's parts besides the task metrics, each computed once into ``eval/<name>.json``: what the model is
measured against, and its image-use gaps."""


def _extra(config: QuickstartConfig, paths: dict[str, Path], name: str, model: tuple) -> Any:
    """``eval/<name>.json`` of :data:`EXTRAS` (``model``: the trained model and processor), computed and written
    (atomically) when it is not there yet."""
    path = paths["eval"] / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = _references(config, paths) if name == "reference" else _image_use(config, paths, model)
    partial_path = path.with_suffix(".json.partial")
    partial_path.write_text(json.dumps(value, indent=2) + "\n")
    partial_path.replace(path)
    return value


def _evaluate_shard(config: QuickstartConfig, paths: dict[str, Path], shard: tuple[int, int]) -> None:
    """One process's block of every evaluation (see ``run_eval``'s ``shard``), then one of :data:`EXTRAS` (shard k
    makes the k-th), so that the merge that follows has only to score."""
    from perceptio.eval.harness import run_eval
    from perceptio.models.build import load_model

    model = load_model(paths["train"] / "model", device="cpu")
    for task, constrain in EVALUATIONS:
        settings = _eval_settings(config, paths, task, constrain=constrain)
        run_eval(settings, progress=config.progress, model=model, shard=shard)
    k, count = shard
    for name in EXTRAS[k::count]:
        _extra(config, paths, name, model)


def _image_use(config: QuickstartConfig, paths: dict[str, Path], model_and_processor: tuple) -> dict[str, Any]:
    """The image-use gap of every task of the recipe's eval datasets (val split; see perceptio.train.image_use)."""
    from perceptio.train.data import TrainingData
    from perceptio.train.image_use import image_use_gap

    recipe = _recipe(config, paths)
    model, processor = model_and_processor
    data = TrainingData.from_config(recipe.data, model.depth_tokenizer, specs=recipe.eval.datasets, progress=False)
    return image_use_gap(model, processor, data, samples=config.eval_limit or 64)


def _references(config: QuickstartConfig, paths: dict[str, Path]) -> dict[str, Any]:
    """What the model is measured against: the point-prompted pretrained SAM2 on the same expressions, the
    majority answer per point count, the VQA answer prior per category (share of its most common answer), and the
    mean training depth map."""
    from perceptio.eval.extract import normalize_answer
    from perceptio.eval.harness import load_task_samples
    from perceptio.models.build import load_model
    from perceptio.models.sam2 import load_sam2
    from perceptio.tokenizers.depth.evaluate import depth_metrics
    from perceptio.tokenizers.depth.pipeline import collect_teacher_maps, mean_depth_map
    from perceptio.tokenizers.depth.teachers import GroundTruthTeacher, teacher_maps
    from perceptio.train.segmenter import load_objects, point_prompt_ciou

    samples = {task: load_task_samples(_eval_settings(config, paths, task, constrain=True)) for task in EVAL_TASKS}
    if config.base is None:
        sam, mean_map = load_sam2(paths["segmenter"]), np.load(paths["tokenizer"] / "mean_map.npy")
    else:  # the base's SAM2 as it was before training, and the mean depth map of this world's train split
        pretrained, _ = load_model(config.base, device="cpu")
        sam, side = pretrained.segmenter, pretrained.config.depth_tokenizer.input_size
        mean_map = mean_depth_map(collect_teacher_maps(paths["world"], split="train", size=side, progress=False))
    size = sam.config.prompt_encoder_config.image_size
    point = point_prompt_ciou(sam, load_objects(samples["refcoco"], size, distinct=False))

    by_points: dict[int, Counter] = {}
    for sample in samples["hardblink"]:
        by_points.setdefault(len(sample.points), Counter())[sample.answer] += 1
    majority = {n: max(c.values()) / sum(c.values()) for n, c in sorted(by_points.items())}
    by_category: dict[str, Counter] = {}
    for sample in samples["vqa"]:
        category = sample.meta.get("category") or "unknown"
        by_category.setdefault(category, Counter())[normalize_answer(sample.answer)] += 1
    vqa_prior = {name: max(c.values()) / sum(c.values()) for name, c in sorted(by_category.items())}

    maps, _ = teacher_maps(samples["depth"], GroundTruthTeacher(), size=mean_map.shape[0], progress=False)
    scores = [depth_metrics(mean_map, m.depth) for m in maps]
    return {
        "point_prompt_ciou": point["ciou"],
        "point_prompt_giou": point["giou"],
        "majority_by_points": majority,
        "vqa_prior_by_category": vqa_prior,
        "mean_map_abs_rel": float(np.mean([s["abs_rel"] for s in scores])),
        "mean_map_delta1": float(np.mean([s["delta1"] for s in scores])),
    }


def _gallery_items(paths: dict[str, Path], count: int) -> list[dict[str, Any]]:
    """The first ``count`` val images with a referring expression, each with one of its VQA questions."""
    from perceptio.data.readers import read_conversations, read_refer

    world = paths["world"]
    refs = read_refer(world, "refcoco", split="val", image_root=world / "images")
    questions: dict[str, Any] = {}
    for sample in read_conversations(world / "vqa" / "val.json", image_root=world / "images"):
        questions.setdefault(Path(sample.image.describe()).name, sample)
    items, seen = [], set()
    if count == 0:
        return items
    for sample in refs:
        name = Path(sample.image.describe()).name
        if name in seen:
            continue
        seen.add(name)
        question = questions.get(name)
        items.append(
            {
                "image": name,
                "expression": sample.query,
                "mask": sample.target_mask(),
                "question": question.query.replace("<image>", "").strip() if question else None,
                "gold": question.answer if question else None,
            }
        )
        if len(items) == count:
            break
    return items


def _predictions(config: QuickstartConfig, paths: dict[str, Path]) -> None:
    from perceptio.data.templates import DEPTH_QUERY, segmentation_query
    from perceptio.inference import Perceptio

    model = Perceptio.from_pretrained(paths["train"] / "model", device="cpu")
    out = paths["predictions"]
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for item in _gallery_items(paths, config.gallery):
        image = paths["world"] / "images" / item["image"]
        prompts = {"segment": segmentation_query(item["expression"]), "depth": DEPTH_QUERY}
        if item["question"]:
            prompts["question"] = item["question"]
        predictions = model.predict(image, list(prompts.values()))
        entry = {"image": item["image"], "gold": item["gold"], "outputs": {}}
        for kind, prompt, prediction in zip(prompts, prompts.values(), predictions, strict=True):
            folder = out / f"{Path(item['image']).stem}_{kind}"
            model.save_prediction(prediction, image, folder, prompt=prompt)
            entry["outputs"][kind] = str(folder.relative_to(out))
        index.append(entry)
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")


def _report(config: QuickstartConfig, paths: dict[str, Path]) -> None:
    out = Path(config.out)
    summary = json.loads((paths["eval"] / "summary.json").read_text())
    _loss_curves(paths["train"]).save(out / "loss_curves.png")
    gallery = _gallery(paths)
    if gallery is not None:
        gallery.save(out / "gallery.png")
    (out / "report.md").write_text(
        _report_text(config, paths, summary, stage_records(out / "stages.json"), gallery is not None)
    )


def _loss_curves(train_dir: Path):  # noqa: ANN202 - PIL image
    """Total loss and every loss term over the steps (log scale), above the per-task token losses."""
    from PIL import Image

    from perceptio.utils.jsonl import read_jsonl
    from perceptio.utils.viz import line_chart

    logs = [r for r in read_jsonl(train_dir / "train_log.jsonl") if "loss" in r]
    terms: dict[str, list[tuple[float, float]]] = {"loss": [(r["step"], r["loss"]) for r in logs]}
    tasks: dict[str, list[tuple[float, float]]] = {}
    for record in logs:
        for name, value in record.get("terms", {}).items():
            terms.setdefault(name, []).append((record["step"], value))
        for name, value in record.get("task_text_loss", {}).items():
            tasks.setdefault(name, []).append((record["step"], value))
    top = line_chart(terms, title="training loss and its terms (log scale)", log_y=True)
    bottom = line_chart(tasks, title="token loss per task (log scale)", log_y=True)
    sheet = Image.new("RGB", (top.width, top.height + bottom.height), (255, 255, 255))
    sheet.paste(top, (0, 0))
    sheet.paste(bottom, (0, top.height))
    return sheet


def _gallery(paths: dict[str, Path]):  # noqa: ANN202 - PIL image or None
    """One row per gallery image: the image, the predicted mask, predicted and true depth, and the text."""
    from PIL import Image

    from perceptio.utils.viz import colorize_depth, text_panel

    index_path = paths["predictions"] / "index.json"
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    tile, rows = 160, []
    for entry in index:
        stem = Path(entry["image"]).stem
        image = Image.open(paths["world"] / "images" / entry["image"]).convert("RGB").resize((tile, tile))
        seg_dir = paths["predictions"] / entry["outputs"]["segment"]
        depth_dir = paths["predictions"] / entry["outputs"]["depth"]
        overlay = Image.open(seg_dir / "overlay.png").convert("RGB").resize((tile, tile))
        blank = Image.new("RGB", (tile, tile), (230, 230, 230))
        depth = (
            Image.open(depth_dir / "depth.png").convert("RGB").resize((tile, tile))
            if (depth_dir / "depth.png").is_file()
            else blank
        )
        truth_path = next(paths["world"].glob(f"depth/*/{stem}.npy"), None)
        truth = (
            colorize_depth(np.load(truth_path), inverse=True).convert("RGB").resize((tile, tile))
            if truth_path is not None
            else blank
        )
        lines = []
        for kind, folder in entry["outputs"].items():
            record = json.loads((paths["predictions"] / folder / "prediction.json").read_text())
            lines.append(f"{kind}: {record['prompt']}")
            lines.append(f"  output: {record['output'][:300]}")
            lines.append(f"  answer: {record['answer']}" + (f" (gold: {entry['gold']})" if kind == "question" else ""))
        text = text_panel(lines, 4 * tile, max_lines=12)
        row = Image.new("RGB", (4 * tile, tile + text.height), (255, 255, 255))
        for k, picture in enumerate((image, overlay, depth, truth)):
            row.paste(picture, (k * tile, 0))
        row.paste(text, (0, tile))
        rows.append(row)
    if not rows:
        return None
    header = text_panel(["image | predicted mask | predicted depth (decoded span) | true depth"], 4 * tile)
    sheet = Image.new("RGB", (4 * tile, header.height + sum(r.height for r in rows)), (255, 255, 255))
    sheet.paste(header, (0, 0))
    y = header.height
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet


def _baseline_cell(accuracy: float | None, film: dict[str, Any]) -> str:
    if film.get("skipped"):
        return "FiLM CNN baseline skipped"
    return f"{_fmt(accuracy, True)} (FiLM CNN trained on VQA alone, {film['steps']} steps, {film['seconds']:.0f} s)"


def _report_text(
    config: QuickstartConfig,
    paths: dict[str, Path],
    summary: dict[str, Any],
    timings: dict[str, dict[str, Any]],
    has_gallery: bool,
) -> str:
    ref, seg, depth = summary["reference"], summary["refcoco"], summary["depth"]
    loose = summary["depth_unconstrained"]
    film_file = paths["baseline"] / "film_vqa.json"
    film = json.loads(film_file.read_text()) if film_file.is_file() else {"skipped": True}
    lines = [
        "# Perceptio quickstart report",
        "",
        f"The tiny Perceptio model trained with `{config.recipe}` on the synthetic world "
        f"({config.num_images} images), evaluated on the val split with greedy decoding. Task metrics use the "
        "library's default protocol, the depth-span grammar constrained while decoding; the well-formed share of "
        "spatial spans is measured with a second, unconstrained pass. A missing mask or span scores as empty or "
        "flat, never skipped.",
        "",
        "Started from: "
        + (
            f"the pretrained tiny base `{config.base}`, with its SAM2 and depth tokenizer."
            if config.base
            else "random weights (--from-scratch); the depth tokenizer and SAM2 were trained on the world first."
        ),
        "",
        "## Targets",
        "",
        *_targets_table(summary),
    ]
    lines += [
        "",
        "## Metrics",
        "",
        "| task | metric | model | reference |",
        "|---|---|---|---|",
        f"| referring segmentation ({seg['count']} expressions) | cIoU | {_fmt(seg.get('ciou'))} | "
        f"{_fmt(ref['point_prompt_ciou'])} (SAM2, true point prompt) |",
        f"| | gIoU | {_fmt(seg.get('giou'))} | {_fmt(ref['point_prompt_giou'])} |",
        f"| | no mask | {_fmt(seg.get('missing_seg_rate'), True)} | |",
    ]
    programmatic = (summary["hardblink"].get("programmatic") or {}).get("by_point_count", {})
    for n, base in ref["majority_by_points"].items():
        acc = _point_accuracy(summary, n)
        read_off = programmatic.get(str(n), {})
        lines.append(
            f"| relative depth, {n} points | accuracy | {_fmt(acc, True)} | {_fmt(base, True)} (majority answer); "
            f"{_fmt(read_off.get('accuracy'), True)} read off the model's own span at the markers "
            f"({read_off.get('total', 0)} spans) |"
        )
    lines += [
        f"| relative depth, all | unparsed answers | {_fmt(summary['hardblink'].get('unparsed_rate'), True)} | |",
        f"| depth ({depth['count']} maps) | AbsRel | {_fmt(depth.get('abs_rel'))} | {_fmt(ref['mean_map_abs_rel'])} "
        "(mean training map) |",
        f"| | delta<1.25 | {_fmt(depth.get('delta1'), True)} | {_fmt(ref['mean_map_delta1'], True)} |",
        f"| | spans decoded | {_fmt(depth.get('decoded_rate'), True)} | |",
        f"| VQA ({summary['vqa']['count']} questions) | accuracy | {_fmt(summary['vqa'].get('accuracy'), True)} | "
        f"{_baseline_cell(film.get('accuracy'), film)} |",
        *[
            f"| VQA, {name} ({entry['count']}) | accuracy | {_fmt(entry['accuracy'], True)} | "
            f"{_fmt(ref.get('vqa_prior_by_category', {}).get(name), True)} (answer prior); "
            f"{_baseline_cell(film.get('by_category', {}).get(name, {}).get('accuracy'), film)} |"
            for name, entry in summary["vqa"].get("by_category", {}).items()
        ],
        f"| spatial spans (relative depth + depth) | well-formed, unconstrained decoding | "
        f"{_fmt(summary['well_formed_rate'], True)} | |",
        f"| depth, unconstrained decoding | AbsRel | {_fmt(loose.get('abs_rel'))} | "
        f"{_fmt(loose.get('abs_rel_decoded'))} over its {_fmt(loose.get('decoded_rate'), True)} well-formed spans |",
        "",
        "Depth metrics are computed on normalised inverse depth (1 = nearest) at the tokenizer's resolution. "
        "Referring segmentation scores the mask of each answer's first segmentation token, and decoding stops there "
        "(`perceptio eval refcoco --first-mask`): the tokens before it, and so the mask, are the whole answer's.",
        "",
        "## Image use",
        "",
        "Teacher-forced val loss of each task with the right images and with the images shuffled across the batch; "
        "the gap is zero when the model does not use the image.",
        "",
        "| task | examples | loss (right images) | loss (shuffled) | gap | largest term gaps |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {e['count']} | {e['real']['loss']:.3f} | {e['shuffled']['loss']:.3f} | {e['gap']:+.3f} | "
            + ", ".join(f"{k} {v:+.3f}" for k, v in sorted(e["gap_terms"].items(), key=lambda kv: -abs(kv[1]))[:3])
            + " |"
            for name, e in (summary.get("image_use") or {}).items()
        ],
        "",
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    if has_gallery:
        lines += [
            "## Gallery",
            "",
            "![gallery](gallery.png)",
            "",
            f"The prediction files are in `{paths['predictions']}`.",
            "",
        ]
    lines += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {record['seconds']} |" for name, record in timings.items() if "seconds" in record]
    beside = "segmenter" if config.base is None else "train"
    lines += ["", f"The {beside} and baseline stages run side by side (one core each): their times overlap."]
    lines += ["", f"Predictions and metrics per task: `{paths['eval']}`; the model: `{paths['train'] / 'model'}`.", ""]
    return "\n".join(lines)
