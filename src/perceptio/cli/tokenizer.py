"""`perceptio tokenizer`: train and evaluate the depth tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from perceptio.cli._common import (
    fail,
    print_table,
)

tokenizer_app = typer.Typer(help="Train and evaluate the depth tokenizer (VQ-VAE).", no_args_is_help=True)

_TEACHER_HELP = "ground-truth (alias exact: the depth stored with the data) or depth-anything:/path/to/checkpoint."


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[Path, typer.Option(help="A synthetic world, a depth folder (depth.json), or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Output folder: the tokenizer checkpoint, logs and checkpoints/.")],
    preset: Annotated[
        str, typer.Option(help="tiny (64 px, 8x8 codes, K=32) or aurora (320 px, 10x10, K=128).")
    ] = "tiny",
    teacher: Annotated[str, typer.Option(help=_TEACHER_HELP)] = "ground-truth",
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="Maps per step.")] = 8,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 3e-4,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Steps between checkpoints (0: none).")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of batch sampling and codebook restarts.")] = 0,
    split: Annotated[str, typer.Option(help="Split of a synthetic world to train on.")] = "train",
    image_dir: Annotated[
        Path | None, typer.Option(help="Images of a depth folder, if not beside the depth maps.")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Teacher-map cache (default $PERCEPTIO_CACHE or ~/.cache/perceptio).")
    ] = None,
    device: Annotated[str, typer.Option(help="Device of the teacher network (cpu, cuda).")] = "cpu",
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the newest checkpoint in --out.")
    ] = False,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad/--no-skip-bad", help="Skip bad maps (listed in skipped.json).")
    ] = False,
) -> None:
    """Train the depth tokenizer on teacher depth maps, with checkpoints and --resume."""
    from perceptio.data.errors import DataError
    from perceptio.tokenizers.depth.pipeline import train_from_folder
    from perceptio.tokenizers.depth.train import TokenizerTrainConfig
    from perceptio.utils.runlock import RunFolderLockedError

    try:
        config = TokenizerTrainConfig(
            steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed
        )
        _, report = train_from_folder(
            data,
            out,
            preset=preset,
            train_config=config,
            teacher=teacher,
            split=split,
            image_dir=image_dir,
            cache_dir=cache_dir,
            device=device,
            resume=resume,
            skip_bad=skip_bad,
        )
    except (
        DataError,
        FileExistsError,
        FileNotFoundError,
        FloatingPointError,
        KeyError,
        RunFolderLockedError,
        ValueError,
    ) as err:
        fail(str(err).strip('"'))
    summary = json.loads((out / "training.json").read_text())
    final = summary["final"]
    typer.echo(
        f"saved the tokenizer to {out}: {steps} steps, loss {final.get('loss', float('nan')):.4f}, "
        f"codebook usage {100 * final.get('codebook_usage', 0):.0f}% ({len(report)} map(s) skipped)"
    )


@tokenizer_app.command("eval")
def tokenizer_eval(
    ckpt: Annotated[Path, typer.Option(help="A tokenizer checkpoint folder (config.json + model.safetensors).")],
    data: Annotated[Path, typer.Option(help="A synthetic world, a depth folder, or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Where metrics.json and reconstructions.png go.")],
    split: Annotated[str, typer.Option(help="Split of a synthetic world to evaluate on.")] = "val",
    teacher: Annotated[str, typer.Option(help=_TEACHER_HELP)] = "ground-truth",
    image_dir: Annotated[
        Path | None, typer.Option(help="Images of a depth folder, if not beside the depth maps.")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Teacher-map cache.")] = None,
    device: Annotated[str, typer.Option(help="Device (cpu, cuda).")] = "cpu",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N maps.")] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad/--no-skip-bad", help="Skip bad maps (listed in skipped.json).")
    ] = False,
) -> None:
    """Measure what the tokenizer keeps: AbsRel, RMSE, delta<1.25, closest-point accuracy, codebook usage."""
    from perceptio.data.errors import DataError
    from perceptio.tokenizers.depth.model import CheckpointMismatchError
    from perceptio.tokenizers.depth.pipeline import evaluate_folder

    try:
        results = evaluate_folder(
            ckpt,
            data,
            out,
            split=split,
            teacher=teacher,
            image_dir=image_dir,
            cache_dir=cache_dir,
            device=device,
            limit=limit,
            skip_bad=skip_bad,
        )
    except (DataError, FileNotFoundError, CheckpointMismatchError, ValueError) as err:
        fail(str(err))
    print_tokenizer_metrics(results)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'reconstructions.png'}")


def print_tokenizer_metrics(results: dict) -> None:
    """Print tokenizer-vs-baseline metrics as a table."""
    ours, base = results["tokenizer"], results.get("mean_map_baseline")
    unit = " (m)" if results["space"] == "metric_depth" else ""
    rows: list[tuple[str, ...]] = [("", "tokenizer", "mean-map baseline")]

    def fmt(value: object, pct: bool = False) -> str:
        if value is None:
            return "-"
        return f"{100 * float(value):.1f}%" if pct else f"{float(value):.4f}"

    rows.append(("AbsRel", fmt(ours["abs_rel"]), fmt(base["abs_rel"]) if base else "-"))
    rows.append((f"RMSE{unit}", fmt(ours["rmse"]), fmt(base["rmse"]) if base else "-"))
    rows.append(("delta<1.25", fmt(ours["delta1"], True), fmt(base["delta1"], True) if base else "-"))
    rows.append(("RMSE (normalised)", fmt(ours["rmse_normalized"]), fmt(base["rmse_normalized"]) if base else "-"))
    for n, acc in ours["closest_point_accuracy"].items():
        sets = ours["closest_point_sets"][n]
        rows.append(
            (
                f"closest of {n} points ({sets} sets)",
                fmt(acc, True),
                fmt(base["closest_point_accuracy"][n], True) if base else "-",
            )
        )
    book = results["codebook"]
    rows.append(("codebook usage", fmt(book["usage"], True), ""))
    rows.append(("codebook perplexity", f"{book['perplexity']:.1f} of {book['num_codes']}", ""))
    typer.echo(
        f"{results['num_maps']} maps of {results['data']} ({results['split']}), "
        f"metrics in {results['space'].replace('_', ' ')}"
    )
    print_table(rows)
