"""`perceptio experiment`: controlled experiments on the synthetic world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perceptio.cli._common import (
    fail,
)
from perceptio.experiments.grounding import ARMS as LADDER_ARMS
from perceptio.experiments.grounding import LEVELS

experiment_app = typer.Typer(help="Controlled experiments on the synthetic world.", no_args_is_help=True)


@experiment_app.command("spatial-cot")
def experiment_spatial_cot(
    out: Annotated[Path, typer.Option(help="Experiment folder (reused and resumed when it exists).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value recipe overrides applied to every arm.")
    ] = None,
    budget_minutes: Annotated[
        float, typer.Option(min=0.0, help="Training budget per arm: the steps the spatial arm makes in M minutes.")
    ] = 10.0,
    steps: Annotated[int | None, typer.Option(min=1, help="Steps per arm (instead of --budget-minutes).")] = None,
    preset: Annotated[str, typer.Option(help="Model preset: tiny or smol.")] = "tiny",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per arm (0..N-1).")] = 1,
    recipe: Annotated[Path, typer.Option(help="Training recipe shared by the arms.")] = Path("configs/tiny_synth.yaml"),
    num_images: Annotated[int, typer.Option(min=10, help="Images in the synthetic world.")] = 4000,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Samples per task and split evaluated.")] = 300,
    tokenizer_steps: Annotated[int, typer.Option(min=1, help="Depth-tokenizer training steps.")] = 1500,
    segmenter_steps: Annotated[int, typer.Option(min=1, help="SAM2 pretraining steps.")] = 1500,
    jobs: Annotated[int | None, typer.Option(min=1, help="Processes at once (default: the number of cores).")] = None,
    arms: Annotated[
        str, typer.Option(help="Comma-separated arms to run: spatial, direct, no_marker_count.")
    ] = "spatial,direct,no_marker_count",
    base: Annotated[
        Path | None,
        typer.Option(help="Fine-tune every arm from this pretrained base (default: the shipped tiny base, tiny only)."),
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train every arm from the preset's random weights.")
    ] = False,
) -> None:
    """Train and evaluate, on the same data and budget, Perceptio with spatial tokens before the answer, the same
    model answering directly, and Perceptio without the marker and count losses; write results.md."""
    from perceptio.experiments.spatial_cot import SpatialCotConfig, run_spatial_cot

    if not recipe.is_file():
        fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    budget = f"--steps {steps}" if steps is not None else f"--budget-minutes {budget_minutes:g}"
    if from_scratch and base is not None:
        fail("--base and --from-scratch exclude each other")
    if base is None and not from_scratch and preset == "tiny":
        from perceptio.weights import shipped

        try:
            base = shipped("tiny-base")
        except FileNotFoundError:
            base = None  # a checkout without the shipped weights trains from scratch, as the report says
    start = f" --base {base}" if base is not None else " --from-scratch"
    command = (
        f"perceptio experiment spatial-cot --out {out} {budget} --preset {preset} --seeds {seeds} --recipe {recipe} "
        f"--num-images {num_images} --eval-limit {eval_limit} --tokenizer-steps {tokenizer_steps} "
        f"--segmenter-steps {segmenter_steps} --arms {arms}{start}" + "".join(f" {o}" for o in overrides or [])
    )
    try:
        config = SpatialCotConfig(
            command=command,
            out=out,
            preset=preset,
            recipe=recipe,
            overrides=tuple(overrides or ()),
            steps=steps,
            budget_minutes=budget_minutes,
            seeds=seeds,
            num_images=num_images,
            eval_limit=eval_limit,
            tokenizer_steps=tokenizer_steps,
            segmenter_steps=segmenter_steps,
            arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
            base=base,
            **({"jobs": jobs} if jobs else {}),
        )
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
