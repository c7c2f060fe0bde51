"""Helpers the command modules share: one-line failures, tables, the shipped model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def model_or_shipped(model: Path | None) -> Path:
    """``--model``, or the tiny Perceptio model that ships with the package."""
    if model is not None:
        return model
    from perceptio.weights import shipped

    try:
        folder = shipped("tiny-perceptio")
    except FileNotFoundError as err:
        fail(f"no --model given, and {err}")
    typer.echo(f"using the shipped tiny Perceptio model {folder}", err=True)
    return folder


def end_distributed() -> None:
    """Leave a torchrun process through barrier, destroy, flush and ``os._exit(0)``: gloo can otherwise abort at
    interpreter exit (SIGABRT) and fail the torchrun job."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        typer.echo(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            typer.echo("  ".join("-" * w for w in widths))


def flat_metrics(payload: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in payload.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def format_metric(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
