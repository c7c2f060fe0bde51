"""`perceptio quickstart` and `perceptio demo`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from perceptio.cli._common import (
    config_command,
    fail,
)
from perceptio.quickstart import QuickstartConfig


@config_command(
    QuickstartConfig,
    "overrides",
    "out",
    "recipe",
    "num_images",
    "world_seed",
    "tokenizer_steps",
    "segmenter_steps",
    "eval_limit",
    "gallery",
    "baseline_steps",
    "base",
    arguments=("overrides",),
)
def quickstart(
    settings: dict[str, Any],
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train Perceptio from random weights instead of the base.")
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option(help="After the report, copy the model here with a model card and SHA256SUMS (a new folder)."),
    ] = None,
) -> None:
    """The main job, end to end: render the synthetic world, pretrain the tiny SAM2 and depth tokenizer, fine-tune
    Perceptio from the pretrained tiny base, evaluate it on the val split, predict a few images and write a report.

    Finished stages are reused: a second run only redoes what changed (and what follows it).
    """
    from perceptio.config import ConfigError
    from perceptio.data.errors import DataError
    from perceptio.eval.harness import IncompleteEvaluationError
    from perceptio.quickstart import export_quickstart_model, run_quickstart
    from perceptio.utils.runlock import RunFolderLockedError

    recipe = settings["recipe"]
    if not recipe.is_file():
        fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    try:
        if from_scratch and "base" in settings:
            fail("--base and --from-scratch exclude each other")
        config = QuickstartConfig(**settings, **({"base": None} if from_scratch else {}))
        typer.echo(f"starting from {config.base or 'random weights (--from-scratch)'}")
        report = run_quickstart(config, echo=typer.echo)
        if export is not None:
            command = "perceptio quickstart " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
            typer.echo(f"exported: {export_quickstart_model(config, export, command=command)}")
    except (
        FileExistsError,
        ConfigError,
        DataError,
        FileNotFoundError,
        FloatingPointError,
        IncompleteEvaluationError,
        RunFolderLockedError,
        ValueError,
    ) as err:
        fail(str(err).strip('"'))
    typer.echo(f"report: {report}")


def demo(
    model: Annotated[
        Path | None, typer.Option(help="A model folder; default: the tiny Perceptio model shipped with the package.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to serve on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: Gradio's, from 7860).")] = None,
    hardblink: Annotated[
        Path | None, typer.Option(help="A HardBLINK folder: a few of its questions become examples.")
    ] = None,
) -> None:
    """A web page that shows what the model sees: the answer, the masks on the image, the decoded depth map with
    the marker letters, the generated sequence and its depth-span grid, and the latency."""
    try:
        import gradio  # noqa: F401 - only to say how to install it
    except ImportError:
        fail("the demo needs gradio: pip install 'perceptio[demo]' (or make browser)")
    from perceptio.demo.app import launch

    if model is not None and not (model / "config.json").is_file():
        fail(f"{model}: not a model folder (no config.json); give a perceptio train model/ folder")
    typer.echo(f"serving on http://{host}:{port or 7860} (Ctrl+C stops)", err=True)
    launch(model, host=host, port=port, hardblink=hardblink)
