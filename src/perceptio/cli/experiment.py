"""`perceptio experiment`: controlled experiments on the synthetic world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from perceptio.cli._common import (
    config_command,
    fail,
)
from perceptio.experiments.grounding import ARMS as LADDER_ARMS
from perceptio.experiments.grounding import LEVELS
from perceptio.experiments.spatial_cot import SpatialCotConfig

experiment_app = typer.Typer(help="Controlled experiments on the synthetic world.", no_args_is_help=True)


@experiment_app.command("spatial-cot")
@config_command(
    SpatialCotConfig,
    "out",
    "overrides",
    "budget_minutes",
    "steps",
    "preset",
    "seeds",
    "recipe",
    "num_images",
    "eval_limit",
    "tokenizer_steps",
    "segmenter_steps",
    "jobs",
    "arms",
    "base",
    arguments=("overrides",),
)
def experiment_spatial_cot(
    settings: dict[str, Any],
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train every arm from the preset's random weights.")
    ] = False,
) -> None:
    """Train and evaluate, on the same data and budget, Perceptio with spatial tokens before the answer, the same
    model answering directly, and Perceptio without the marker and count losses; write results.md."""
    from perceptio.experiments.spatial_cot import run_spatial_cot

    out, recipe, base = settings["out"], settings["recipe"], settings["base"]
    if not recipe.is_file():
        fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    steps = settings["steps"]
    budget = f"--steps {steps}" if steps is not None else f"--budget-minutes {settings['budget_minutes']:g}"
    if from_scratch and base is not None:
        fail("--base and --from-scratch exclude each other")
    if base is None and not from_scratch and settings["preset"] == "tiny":
        from perceptio.weights import shipped

        try:
            base = shipped("tiny-base")
        except FileNotFoundError:
            base = None  # a checkout without the shipped weights trains from scratch, as the report says
    start = f" --base {base}" if base is not None else " --from-scratch"
    command = (
        f"perceptio experiment spatial-cot --out {out} {budget} --preset {settings['preset']} "
        f"--seeds {settings['seeds']} --recipe {recipe} --num-images {settings['num_images']} "
        f"--eval-limit {settings['eval_limit']} --tokenizer-steps {settings['tokenizer_steps']} "
        f"--segmenter-steps {settings['segmenter_steps']} --arms {','.join(settings['arms'])}{start}"
        + "".join(f" {o}" for o in settings["overrides"])
    )
    try:
        config = SpatialCotConfig(**{**settings, "base": base}, command=command)
        run_spatial_cot(config, echo=typer.echo)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"results in {out / 'results.md'} and {out / 'results.json'}")


@experiment_app.command("grounding")
def experiment_grounding(
    out: Annotated[Path, typer.Option(help="Experiment folder (finished jobs are reused).")],
    world: Annotated[
        Path | None,
        typer.Option(
            help="A rendered world (perceptio data synth); levels L2-L4 read its VQA, L5 its relative-depth "
            "questions, L6 its referring expressions."
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="L5's trained depth tokenizer (default: `tokenizer` next to the world).")
    ] = None,
    segmenter: Annotated[
        Path | None, typer.Option(help="L6's pretrained SAM2 (default: `segmenter` next to the world).")
    ] = None,
    levels: Annotated[
        str, typer.Option(help=f"Comma-separated levels, of: {', '.join(f'{k} ({v})' for k, v in LEVELS.items())}.")
    ] = "L0,L1,L2,L3,L4",
    arms: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated arms, of: {', '.join(LADDER_ARMS)} (base: fine-tune the pretrained base; "
            "segrms: seg_prompt_rms 0.5; pos: image_token_pos sincos; vinit: vision_init_std 0.1)."
        ),
    ] = "baseline,center,standardize",
    base: Annotated[Path | None, typer.Option(help="The base of the base arm (default: the shipped one).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Training steps per level and arm.")] = 600,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between validation points of the curve.")] = 200,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per (level, arm).")] = 1,
    train_images: Annotated[int, typer.Option(min=2, help="Training questions per level.")] = 2000,
    val_images: Annotated[int, typer.Option(min=2, help="Validation questions per level.")] = 300,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (warm-up, cosine).")] = 1e-3,
    jobs: Annotated[int | None, typer.Option(min=1, help="Processes at once (default: the number of cores).")] = None,
) -> None:
    """The grounding ladder: train the tiny model on one capability at a time (whole-image colour, a small
    object's colour, binding, left/right, count, the closest marker through the depth span, the referred object's
    mask) for each arm (model options), and report accuracy, the answer prior and the image-use gap (val loss with
    shuffled images minus with the right ones)."""
    from perceptio.experiments.grounding import GroundingConfig, run_grounding

    try:
        config = GroundingConfig(
            out=out,
            world=world,
            levels=tuple(x.strip() for x in levels.split(",") if x.strip()),
            arms=tuple(x.strip() for x in arms.split(",") if x.strip()),
            steps=steps,
            eval_every=eval_every,
            seeds=seeds,
            train_images=train_images,
            val_images=val_images,
            lr=lr,
            base=base,
            tokenizer=tokenizer,
            segmenter=segmenter,
            **({"jobs": jobs} if jobs else {}),
        )
        run_grounding(config, echo=typer.echo)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"results in {out / 'results.md'} and {out / 'results.json'}")
