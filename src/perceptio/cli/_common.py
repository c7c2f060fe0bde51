"""Helpers the command modules share: one-line failures, tables, the shipped model, options made from a settings
dataclass."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

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


def config_command(
    config: type, *names: str, arguments: Collection[str] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one parameter per named field of the settings dataclass ``config``, in the order named.

    The field is the one definition of the option: its type, its default, its help (``metadata["help"]``) and its
    limits (``metadata["min"]``/``["max"]``), which the dataclass checks too. The command keeps its own
    hand-written parameters after these, and receives the given values first, as ``settings``: keyword arguments
    for ``config``. Fields named in ``arguments`` are positional; a ``tuple[str, ...]`` field is taken as a list
    of arguments or as one comma-separated option; a field with a default factory is an option that defaults to
    None (its help says what the factory gives) and is left out of ``settings`` unless given.
    """
    hints = typing.get_type_hints(config)
    specs = {spec.name: spec for spec in dataclasses.fields(config)}
    parameters, converters = [], {}
    for name in names:
        spec, kind = specs[name], hints[name]
        factory = spec.default_factory is not dataclasses.MISSING
        default: Any = None if factory else spec.default
        if default is dataclasses.MISSING:
            default = inspect.Parameter.empty
        if "help" not in spec.metadata:
            raise TypeError(f"{config.__name__}.{name} has no help: give it field(metadata={{'help': ...}})")
        help_text = spec.metadata["help"]
        if typing.get_origin(kind) is tuple and name in arguments:
            kind, default, converters[name] = list[str] | None, None, lambda value: tuple(value or ())
        elif typing.get_origin(kind) is tuple:
            kind, default = str, ",".join(default)
            converters[name] = lambda value: tuple(part.strip() for part in value.split(",") if part.strip())
        elif factory:
            kind = kind | None
        if name in arguments:
            info = typer.Argument(help=help_text)
        else:
            info = typer.Option(help=help_text, min=spec.metadata.get("min"), max=spec.metadata.get("max"))
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])
        )

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [  # after `settings`; keyword-only like the generated ones, which typer passes by name too
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for parameter in list(inspect.signature(command, eval_str=True).parameters.values())[1:]
        ]

        @functools.wraps(command)
        def wrapper(**values: Any) -> None:
            settings = {}
            for name in names:
                value = converters.get(name, lambda given: given)(values.pop(name))
                if value is not None or specs[name].default_factory is dataclasses.MISSING:
                    settings[name] = value
            command(settings, **values)

        wrapper.__signature__ = inspect.Signature([*parameters, *own], return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in (*parameters, *own)} | {"return": None}
        return wrapper

    return decorate
