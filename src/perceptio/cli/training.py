"""`perceptio train` and `perceptio pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perceptio.cli._common import (
    end_distributed,
    fail,
)


def train(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="A training recipe (YAML), e.g. configs/tiny_synth.yaml.")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the recipe, e.g. run.steps=50 optim.lr=5e-4.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the newest checkpoint in run.out_dir.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Replace an earlier run's outputs in run.out_dir.")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Teacher-map cache (default $PERCEPTIO_CACHE or ~/.cache/perceptio).")
    ] = None,
) -> None:
    """Train Perceptio from a recipe. Under torchrun (`torchrun --nproc_per_node=N -m perceptio train ...`) every
    process trains its share of each global batch (DDP, or FSDP with run.distributed=fsdp)."""
    from perceptio.config import ConfigError, load_config
    from perceptio.data.errors import DataError
    from perceptio.tokenizers.depth.pipeline import default_cache_dir
    from perceptio.train.config import TrainConfig
    from perceptio.train.loop import train as run_training
    from perceptio.utils.distributed import launched_by_torchrun
    from perceptio.utils.runlock import RunFolderLockedError

    distributed = launched_by_torchrun()
    try:
        recipe = load_config(TrainConfig, config, overrides or [])
        result = run_training(recipe, resume=resume, overwrite=overwrite, cache_dir=cache_dir or default_cache_dir())
    except (
        ConfigError,
        DataError,
        FileExistsError,
        FileNotFoundError,
        FloatingPointError,
        RunFolderLockedError,
        ValueError,
    ) as err:
        fail(str(err).strip('"'))
    if result.model_dir is not None:
        final = result.last_log
        typer.echo(
            f"saved the model to {result.model_dir} after {result.steps} steps "
            f"(loss {final.get('loss', float('nan')):.4f}); logs in {result.out_dir}"
        )
    if distributed:
        end_distributed()


def pretrain(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the base recipe, e.g. run.steps=2000.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder; the base model is written to OUT/base.")] = Path("runs/base"),
    recipe: Annotated[Path, typer.Option(help="The base recipe.")] = Path("configs/tiny_base.yaml"),
    world: Annotated[
        Path | None, typer.Option(help="Use this rendered world (perceptio data synth) instead of rendering one.")
    ] = None,
    num_images: Annotated[int, typer.Option(min=10, help="Images in the pretraining world.")] = 20000,
    world_seed: Annotated[int, typer.Option(help="Seed of the pretraining world (not the quickstart's 0).")] = 1,
    tokenizer_steps: Annotated[int, typer.Option(min=1, help="Depth-tokenizer training steps.")] = 1500,
    segmenter_steps: Annotated[int, typer.Option(min=1, help="SAM2 pretraining steps.")] = 1500,
) -> None:
    """Pretrain the tiny base (the tiny counterpart of pretrained InternVL + SAM2): render a large world, train the
    depth tokenizer and SAM2, then the VLM on text-only alignment tasks; write OUT/base with its model card.

    Resumable: run the same command again after an interruption.
    """
    from perceptio.config import ConfigError
    from perceptio.data.errors import DataError
    from perceptio.pretrain import PretrainConfig, run_pretrain
    from perceptio.utils.runlock import RunFolderLockedError

    if not recipe.is_file():
        fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    source = f"--world {world}" if world is not None else f"--num-images {num_images} --world-seed {world_seed}"
    command = (
        f"perceptio pretrain --out {out} --recipe {recipe} {source} "
        f"--tokenizer-steps {tokenizer_steps} --segmenter-steps {segmenter_steps}"
        + "".join(f" {o}" for o in overrides or [])
    )
    try:
        config = PretrainConfig(
            out=out,
            recipe=recipe,
            world=world,
            overrides=tuple(overrides or ()),
            num_images=num_images,
            world_seed=world_seed,
            tokenizer_steps=tokenizer_steps,
            segmenter_steps=segmenter_steps,
            command=command,
        )
        base = run_pretrain(config, echo=typer.echo)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError, RunFolderLockedError, ValueError) as err:
        fail(str(err).strip('"'))
    typer.echo(f"base model: {base} (model card: {base / 'MODEL_CARD.md'})")
