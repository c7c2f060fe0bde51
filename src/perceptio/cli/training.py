"""`perceptio train` and `perceptio pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from perceptio.cli._common import (
    config_command,
    end_distributed,
    fail,
)
from perceptio.pretrain import PretrainConfig


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


@config_command(
    PretrainConfig,
    "overrides",
    "out",
    "recipe",
    "world",
    "num_images",
    "world_seed",
    "tokenizer_steps",
    "segmenter_steps",
    arguments=("overrides",),
)
def pretrain(settings: dict[str, Any]) -> None:
    """Pretrain the tiny base (the tiny counterpart of pretrained InternVL + SAM2): render a large world, train the
    depth tokenizer and SAM2, then the VLM on text-only alignment tasks; write OUT/base with its model card.

    Resumable: run the same command again after an interruption.
    """
    from perceptio.config import ConfigError
    from perceptio.data.errors import DataError
    from perceptio.pretrain import run_pretrain
    from perceptio.utils.runlock import RunFolderLockedError

    out, recipe, world = settings["out"], settings["recipe"], settings["world"]
    if not recipe.is_file():
        fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    if world is not None:
        source = f"--world {world}"
    else:
        source = f"--num-images {settings['num_images']} --world-seed {settings['world_seed']}"
    command = (
        f"perceptio pretrain --out {out} --recipe {recipe} {source} "
        f"--tokenizer-steps {settings['tokenizer_steps']} --segmenter-steps {settings['segmenter_steps']}"
        + "".join(f" {o}" for o in settings["overrides"])
    )
    try:
        base = run_pretrain(PretrainConfig(**settings, command=command), echo=typer.echo)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError, RunFolderLockedError, ValueError) as err:
        fail(str(err).strip('"'))
    typer.echo(f"base model: {base} (model card: {base / 'MODEL_CARD.md'})")
