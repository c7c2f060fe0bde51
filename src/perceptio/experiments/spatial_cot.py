"""The spatial chain-of-thought experiment: does writing spatial tokens before the answer help?

``perceptio experiment spatial-cot --out DIR`` trains three arms on the same data, with the same optimiser steps,
batch and seeds, and evaluates them the same way:

* ``spatial``: Perceptio, segmentation token and depth span before the answer (the recipe as it is);
* ``direct``: the same model answering directly, with no depth span before the answer (``data.spatial_cot=false``;
  Sa2VA / plain-VLM style; the segmentation token stays, since masks come from it, and the depth-generation task
  stays in the mixture so both arms see the same images and depth supervision);
* ``no_marker_count``: Perceptio without the depth marker and count losses (their weights set to 0).

The budget: ``--steps`` optimiser steps per arm, or, with ``--budget-minutes M``, the steps the ``spatial`` arm
(the slowest: the longest sequences) makes in M minutes on one thread, measured by a short probe run. Every arm
then trains that many steps, so the direct arm spends less compute, never more. Arms run as parallel one-thread
processes, as many at once as there are cores; evaluation (greedy, *unconstrained* decoding, so malformed spans
show) runs the same way. Each stage is reused when a run is repeated, so an interrupted experiment resumes.
Results: ``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perceptio.pipeline import (
    Job,
    base_fingerprint,
    check_limits,
    fresh_folder,
    run_jobs,
    stage_records,
    train_perceptio,
    world_eval_settings,
)
from perceptio.quickstart import QuickstartConfig, run_quickstart
from perceptio.utils.jsonl import read_jsonl

if TYPE_CHECKING:
    from perceptio.train.config import TrainConfig

__all__ = ["ARMS", "Arm", "SpatialCotConfig", "run_spatial_cot"]


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    overrides: tuple[str, ...]


ARMS = (
    Arm("spatial", "spatial tokens before the answer (Perceptio)", ()),
    Arm("direct", "direct answer, no spatial tokens before it", ("data.spatial_cot=false",)),
    Arm(
        "no_marker_count",
        "spatial tokens, without the marker and count losses",
        ("model.loss_weights.depth_marker=0", "model.loss_weights.depth_count=0"),
    ),
)

#: (task, splits) evaluated for every arm.
EVALS = (("refcoco", ("val", "test")), ("hardblink", ("val", "test")), ("vqa", ("val", "test")))
EVAL_BATCH_SIZE = 16


@dataclass(frozen=True)
class SpatialCotConfig:
    """What the experiment runs; each field's ``help`` and limits are the ``perceptio experiment spatial-cot``
    option's, and are checked here too. ``base`` None trains every arm from the preset's random weights (the
    command line defaults to the shipped tiny base for the ``tiny`` preset), as the paper fine-tunes from InternVL.
    The field order is that of ``results.json``'s ``config``."""

    out: Path = field(metadata={"help": "Experiment folder (reused and resumed when it exists)."})
    preset: str = field(default="tiny", metadata={"help": "Model preset: tiny or smol."})
    recipe: Path = field(
        default=Path("configs/tiny_synth.yaml"), metadata={"help": "Training recipe shared by the arms."}
    )
    overrides: tuple[str, ...] = field(
        default=(), metadata={"help": "key=value recipe overrides applied to every arm."}
    )
    steps: int | None = field(default=None, metadata={"help": "Steps per arm (instead of --budget-minutes).", "min": 1})
    budget_minutes: float = field(
        default=10.0,
        metadata={"help": "Training budget per arm: the steps the spatial arm makes in M minutes.", "min": 0.0},
    )
    seeds: int = field(default=1, metadata={"help": "Seeds per arm (0..N-1).", "min": 1})
    num_images: int = field(default=4000, metadata={"help": "Images in the synthetic world.", "min": 10})
    tokenizer_steps: int = field(
        default=1500,
        metadata={"help": "Depth-tokenizer training steps (without a base; a base brings its own).", "min": 1},
    )
    segmenter_steps: int = field(
        default=1500, metadata={"help": "SAM2 pretraining steps (without a base; a base brings its own).", "min": 1}
    )
    eval_limit: int | None = field(default=300, metadata={"help": "Samples per task and split evaluated.", "min": 1})
    jobs: int = field(
        default_factory=lambda: max(1, len(os.sched_getaffinity(0))),
        metadata={"help": "Processes at once (default: the number of cores).", "min": 1},
    )
    arms: tuple[str, ...] = field(
        default=tuple(arm.name for arm in ARMS),
        metadata={"help": "Comma-separated arms to run: spatial, direct, no_marker_count."},
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    command: str | None = field(
        default=None, metadata={"help": "The command line that started the experiment, recorded with the results."}
    )
    base: Path | None = field(
        default=None,
        metadata={"help": "Fine-tune every arm from this pretrained base (default: the shipped tiny base, tiny only)."},
    )

    def __post_init__(self) -> None:
        check_limits(self)
        known = {arm.name for arm in ARMS}
        if unknown := sorted(set(self.arms) - known):
            raise ValueError(f"unknown arm(s) {unknown}; the arms are {sorted(known)}")
        if self.steps is None and not self.budget_minutes > 0:
            raise ValueError("give --steps or a positive --budget-minutes")
        if self.preset not in ("tiny", "smol"):
            raise ValueError(f"preset must be tiny or smol, got {self.preset!r}")
        if self.base is not None and not (Path(self.base) / "config.json").is_file():
            raise FileNotFoundError(f"{self.base}/config.json not found: --base must be a saved Perceptio model")


def _last_step(run_dir: Path) -> int:
    logs = read_jsonl(run_dir / "train_log.jsonl") if (run_dir / "train_log.jsonl").is_file() else []
    return int(logs[-1]["step"]) if logs else 0


def _recipe(config: SpatialCotConfig, overrides: list[str]) -> TrainConfig:
    from perceptio.config import load_config
    from perceptio.train.config import TrainConfig

    return load_config(TrainConfig, config.recipe, overrides)


def _train_job(
    name: str, recipe: TrainConfig, log: Path, done: Callable[[], bool], progress: Callable[[], str] = lambda: ""
) -> Job:
    """Train ``recipe`` in a job process, resuming from its newest checkpoint when there is one."""
    return Job(name, partial(train_perceptio, recipe, resume=True, progress=False), log, done, progress)


def _base_overrides(config: SpatialCotConfig, out: Path) -> list[str]:
    if config.base is None:  # the depth tokenizer and SAM2 trained on the world first
        start = [f"model.preset={config.preset}", f"model.depth_tokenizer={out / 'tokenizer'}"]
        start += [f"model.segmenter_weights={out / 'segmenter'}"]
    else:  # the base's own
        start = ["model.preset=null", f"model.init={config.base}", "model.depth_tokenizer=null"]
        start += ["model.segmenter_weights=null"]
    return [
        *start,
        f"data.root={out / 'world'}",
        "run.threads=1",
        "run.data_workers=0",  # the jobs run side by side, one core each: a data worker would double them
        "eval.every=0",
        *config.overrides,
    ]


def _probe_rate(config: SpatialCotConfig, base: list[str], upstream: str, echo: Callable[[str], None]) -> float:
    """Steps per second of the spatial arm on one thread, from a short timed run (its first log window, which
    holds the start-up costs, is left out)."""
    probe = Path(config.out) / "probe"
    overrides = [*base, f"run.out_dir={probe}", "run.steps=40", "run.log_every=10", "run.checkpoint_every=0"]
    fresh_folder(probe, {"recipe": str(config.recipe), "overrides": overrides, "upstream": upstream})
    finished = lambda: (probe / "model" / "model.safetensors").is_file()  # noqa: E731
    run_jobs([_train_job("probe", _recipe(config, overrides), probe / "train.log", finished)], 1, echo=echo)
    logs = read_jsonl(probe / "train_log.jsonl")
    first, last = logs[0], logs[-1]
    return (last["step"] - first["step"]) / max(1e-6, last["seconds"] - first["seconds"])


def run_spatial_cot(config: SpatialCotConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the experiment; returns the results (also written to ``results.json`` / ``results.md``).

    Each training run and evaluation keeps its settings next to its folder (:func:`perceptio.pipeline.fresh_folder`):
    a repeated command reuses finished work and resumes interrupted training; changed settings (or a changed world,
    tokenizer or segmenter) redo the affected runs from scratch."""
    from perceptio.eval.harness import run_eval

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    qs = QuickstartConfig(
        out=out,
        recipe=config.recipe,
        num_images=config.num_images,
        tokenizer_steps=config.tokenizer_steps,
        segmenter_steps=config.segmenter_steps,
        baseline_steps=0,  # the quickstart's FiLM VQA baseline is not part of this experiment
        progress=config.progress,
        base=config.base,
    )
    # from a base: the world (the base brings its depth tokenizer and SAM2); otherwise those trained on it too
    last = "world" if config.base is not None else "segmenter"
    echo("[1/4] world" + ("" if config.base is not None else ", depth tokenizer and pretrained segmenter"))
    run_quickstart(qs, echo=lambda line: echo("  " + line), until=last)
    upstream = stage_records(out / "stages.json")[last]["digest"]  # chains the stages before it
    base = _base_overrides(config, out)
    if config.steps is not None:
        steps, rate = config.steps, None
    else:
        echo(f"[2/4] measuring the spatial arm's speed for a {config.budget_minutes:g}-minute budget")
        rate = _probe_rate(config, base, upstream, echo)
        steps = max(1, int(rate * 60 * config.budget_minutes))
    echo(f"[2/4] every arm trains {steps} steps" + (f" (spatial arm: {rate:.2f} steps/s)" if rate else ""))
    arms = [arm for arm in ARMS if arm.name in config.arms]
    runs: dict[tuple[str, int], Path] = {}
    trained: dict[tuple[str, int], dict[str, Any]] = {}
    jobs = []
    for seed in range(config.seeds):
        for arm in arms:
            run_dir = out / "arms" / f"{arm.name}_seed{seed}"
            runs[(arm.name, seed)] = run_dir
            overrides = [
                *base,
                *arm.overrides,
                f"run.out_dir={run_dir}",
                f"run.steps={steps}",
                f"run.seed={seed}",
                f"model.seed={seed}",
                f"run.checkpoint_every={max(50, steps // 4)}",
            ]
            trained[(arm.name, seed)] = {
                "recipe": str(config.recipe),
                "overrides": overrides,
                "upstream": upstream,
                "base": base_fingerprint(config.base),  # a base retrained in the same folder retrains the arms
            }
            fresh_folder(run_dir, trained[(arm.name, seed)])
            jobs.append(
                _train_job(
                    f"train {arm.name} seed {seed}",
                    _recipe(config, overrides),
                    run_dir.parent / f"{run_dir.name}.train.log",
                    lambda d=run_dir: (d / "model" / "model.safetensors").is_file() and _last_step(d) >= steps,
                    progress=lambda d=run_dir: f"step {_last_step(d)}/{steps}",
                )
            )
    echo(f"[3/4] training {len(jobs)} run(s), {min(config.jobs, len(jobs))} at a time")
    train_began = time.perf_counter()
    run_jobs(jobs, config.jobs, echo=echo)
    train_seconds = time.perf_counter() - train_began
    echo("[4/4] evaluating (unconstrained greedy decoding)")
    eval_jobs = []
    for (arm_name, seed), run_dir in runs.items():
        for task, splits in EVALS:
            for split in splits:
                settings = world_eval_settings(
                    out / "world",
                    task,
                    split,
                    model=run_dir / "model",
                    out=run_dir / "eval" / f"{task}_{split}",
                    limit=config.eval_limit,
                    batch_size=EVAL_BATCH_SIZE,
                    constrain=False,
                )
                fresh_folder(settings.out, {"settings": asdict(settings), "model": trained[(arm_name, seed)]})
                eval_jobs.append(
                    Job(
                        f"eval {arm_name} seed {seed} {task} {split}",
                        partial(run_eval, settings, progress=False),
                        run_dir / "eval" / f"{task}_{split}.log",
                        done=lambda t=settings.out: (t / "metrics.json").is_file(),
                    )
                )
    run_jobs(eval_jobs, config.jobs, echo=echo)
    results = _collect(config, runs, steps, rate, train_seconds, time.perf_counter() - began)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results))
    return results


def _metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text())["metrics"]


def _arm_scores(run_dir: Path, split: str) -> dict[str, float | None]:
    ref = _metrics(run_dir / "eval" / f"refcoco_{split}")
    blink = _metrics(run_dir / "eval" / f"hardblink_{split}")
    vqa = _metrics(run_dir / "eval" / f"vqa_{split}")
    by_points = blink["answer"]["by_point_count"]
    scores: dict[str, float | None] = {
        "ciou": ref.get("ciou"),
        "giou": ref.get("giou"),
        **{f"acc_{n}": by_points.get(str(n), {}).get("accuracy") for n in (2, 3, 4, 5)},
        "acc_345": blink["answer"].get("hardblink_mean"),
        "vqa": vqa.get("accuracy"),
        "unparsed": blink.get("unparsed_rate"),
        "malformed": None if blink["well_formed_rate"] is None else 1 - blink["well_formed_rate"],
        # the closest marker read off the arm's own decoded span: what the span knows, whatever the answer says
        "read_off": (blink.get("programmatic") or {}).get("mean"),
    }
    return scores


def _collect(
    config: SpatialCotConfig,
    runs: dict[tuple[str, int], Path],
    steps: int,
    rate: float | None,
    train_seconds: float,
    total_seconds: float,
) -> dict[str, Any]:
    from perceptio.data.readers import read_hardblink
    from perceptio.eval.tasks import balance_point_counts

    table: dict[str, dict[str, Any]] = {}
    for arm in (a for a in ARMS if a.name in config.arms):
        per_split: dict[str, Any] = {}
        for split in ("val", "test"):
            seeds = [_arm_scores(runs[(arm.name, s)], split) for s in range(config.seeds)]
            merged: dict[str, Any] = {}
            for key in seeds[0]:
                values = [s[key] for s in seeds if s[key] is not None]
                merged[key] = {  # a seed without the figure (e.g. no span written) is listed as None
                    "mean": statistics.fmean(values) if values else None,
                    "sd": statistics.stdev(values) if len(values) > 1 else None,
                    "per_seed": [s[key] for s in seeds],
                }
            per_split[split] = merged
        walls = []
        for s in range(config.seeds):
            records = read_jsonl(runs[(arm.name, s)] / "train_log.jsonl")
            walls.append(records[-1]["seconds"] if records else None)
        table[arm.name] = {"description": arm.description, "train_seconds": walls, "splits": per_split}
    majority = {}
    for split in ("val", "test"):
        questions = read_hardblink(Path(config.out) / "world" / "hardblink" / split)
        if config.eval_limit is not None:  # the questions the arms were evaluated on
            questions = balance_point_counts(questions, config.eval_limit)
        counts: dict[int, Counter] = {}
        for q in questions:
            counts.setdefault(len(q.points), Counter())[q.answer] += 1
        majority[split] = {str(n): max(c.values()) / sum(c.values()) for n, c in sorted(counts.items())}
    return {
        "majority_answer": majority,
        "command": config.command,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "steps": steps,
        "spatial_steps_per_s": rate,
        "train_wall_seconds": train_seconds,
        "total_wall_seconds": total_seconds,
        "arms": table,
    }


def _cell(entry: dict[str, Any], pct: bool = True) -> str:
    mean, sd = entry["mean"], entry["sd"]
    if mean is None:
        return "n/a"
    text = f"{100 * mean:.1f}" if pct else f"{mean:.3f}"
    if sd is not None:
        text += f" ± {100 * sd:.1f}" if pct else f" ± {sd:.3f}"
    return text


def results_table(results: dict[str, Any]) -> str:
    """The markdown tables of ``results.json`` (one per split) in the layout of the paper's claims."""
    config = results["config"]
    lines = [
        "# Spatial chain-of-thought experiment",
        "",
        f"Preset `{config['preset']}`, recipe `{config['recipe']}` with overrides "
        f"{list(config['overrides']) or 'none'}; "
        f"{results['steps']} steps per arm, {config['seeds']} seed(s) (0..{config['seeds'] - 1}), "
        f"{config['num_images']} world images; evaluation: greedy, unconstrained, at most {config['eval_limit']} "
        "samples per task and split. Accuracies in %, mean ± sd over seeds.",
        "",
    ]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    for split in ("val", "test"):
        lines += [
            f"## {split} split",
            "",
            "| arm | RefCOCO-style cIoU | rel. depth 2 pts | 3 pts | 4 pts | 5 pts | mean 3-5 | VQA | malformed spans "
            "| unparsed answers | read off own span (2-5) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, arm in results["arms"].items():
            s = arm["splits"][split]
            malformed = "n/a (banned)" if name == "direct" else _cell(s["malformed"])
            lines.append(
                f"| {name} | {_cell(s['ciou'], pct=False)} | {_cell(s['acc_2'])} | {_cell(s['acc_3'])} | "
                f"{_cell(s['acc_4'])} | {_cell(s['acc_5'])} | {_cell(s['acc_345'])} | {_cell(s['vqa'])} | "
                f"{malformed} | {_cell(s['unparsed'])} | {_cell(s['read_off'])} |"
            )
        base = results["majority_answer"][split]
        lines.append(
            "| majority answer | | "
            + " | ".join(f"{100 * base[n]:.1f}" if n in base else "n/a" for n in ("2", "3", "4", "5"))
            + " | | | | | |"
        )
        lines.append("")
    lines += ["Arms:", ""]
    lines += [
        f"- `{name}`: {arm['description']}; training wall time {arm['train_seconds']} s"
        for name, arm in results["arms"].items()
    ]
    lines += ["", f"Total wall time {results['total_wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)
