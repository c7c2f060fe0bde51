"""`perceptio quickstart` and `perceptio demo`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from perceptio.cli._common import (
    fail,
)


def quickstart(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the training recipe, e.g. run.steps=300.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/quickstart"),
    recipe: Annotated[Path, typer.Option(help="Training recipe.")] = Path("configs/tiny_synth.yaml"),
    num_images: Annotated[int, typer.Option(min=10, help="Images in the synthetic world.")] = 4000,
    world_seed: Annotated[int, typer.Option(help="Seed of the synthetic world.")] = 0,
    tokenizer_steps: Annotated[int, typer.Option(min=1, help="Depth-tokenizer training steps.")] = 1500,
    segmenter_steps: Annotated[int, typer.Option(min=1, help="SAM2 pretraining steps.")] = 1500,
    eval_limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first N samples of each task.")
    ] = None,
    gallery: Annotated[int, typer.Option(min=0, help="Val images in the report's gallery.")] = 4,
    baseline_steps: Annotated[
        int, typer.Option(min=0, help="Steps of the FiLM CNN VQA baseline shown in the report (0: skip it).")
    ] = 1000,
    base: Annotated[
        Path | None, typer.Option(help="The pretrained base to fine-tune from (default: the shipped tiny base).")
    ] = None,
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
    from perceptio.quickstart import QuickstartConfig, export_quickstart_model, run_quickstart
    from perceptio.utils.runlock import RunFolderLockedError

    if not recipe.is_file():
        fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    try:
        config = QuickstartConfig(
            out=out,
            recipe=recipe,
            overrides=tuple(overrides or ()),
            num_images=num_images,
            world_seed=world_seed,
            tokenizer_steps=tokenizer_steps,
            segmenter_steps=segmenter_steps,
            eval_limit=eval_limit,
            gallery=gallery,
            baseline_steps=baseline_steps,
            **({"base": None} if from_scratch else {"base": base} if base is not None else {}),
        )
        if from_scratch and base is not None:
            fail("--base and --from-scratch exclude each other")
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
