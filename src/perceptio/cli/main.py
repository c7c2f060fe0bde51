"""The `perceptio` command line: the root command and its groups. Each command lives in the module of its area
(``cli/data.py``, ``tokenizer.py``, ``segmenter.py``, ``training.py``, ``evaluation.py``, ``apps.py``,
``experiment.py``), parses its options and calls one library function; expected failures (any
:class:`~perceptio.errors.UserError`, and file-system errors that are the user's to fix) become one line on stderr
and exit code 2 here, in one place."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Annotated

import typer

# OpenMP's default wait policy keeps idle threads spinning; beside another busy process on a small machine that
# makes tokenizer training and evaluation 3x slower (bench/under_load.py), where passive waiting slows them in
# proportion to the cores taken. It must be set before torch loads its OpenMP runtime, which no command module
# does at import; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from perceptio import __version__  # noqa: E402 - after the OpenMP setting, although none of these loads torch
from perceptio.cli import apps, evaluation, training  # noqa: E402
from perceptio.cli.data import data_app  # noqa: E402
from perceptio.cli.experiment import experiment_app  # noqa: E402
from perceptio.cli.segmenter import segmenter_app  # noqa: E402
from perceptio.cli.tokenizer import tokenizer_app  # noqa: E402
from perceptio.errors import UserError  # noqa: E402

__all__ = ["app", "main"]


def _flags_without_a_type() -> None:
    """typer's help shows a type column for every option, so a flag reads ``--resume <bool>`` as if it took a
    value; a flag (``--help`` included) shows none."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_a_type()

app = typer.Typer(
    name="perceptio", help="Perceptio: spatial tokens before the answer.", no_args_is_help=True, add_completion=False
)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(segmenter_app, name="segmenter")
app.command()(training.train)
app.command()(evaluation.predict)
app.command("eval")(evaluation.evaluate)
app.command()(apps.quickstart)
app.add_typer(experiment_app, name="experiment")
app.command()(apps.demo)
app.command()(training.pretrain)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def version() -> None:
    """Print the Perceptio version."""
    typer.echo(__version__)


#: File-system errors that are the user's to fix (permissions, a full or read-only disk, a file where a folder
#: should be): one line and exit 2. Any other OSError keeps its traceback.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}


def main() -> None:
    """Entry point of the `perceptio` console script."""
    try:
        app(prog_name="perceptio")
    except UserError as err:  # a command that did not catch it itself: still one line, exit 2
        typer.secho(f"error: {str(err).strip(chr(34))}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as err:
        if err.errno not in _USER_OS_ERRORS:
            raise
        where = f" {err.filename}" if err.filename else ""
        typer.secho(
            f"error: cannot use{where}: {err.strerror}. Fix: choose a path you can write to (e.g. another --out), "
            "free disk space, or fix the permissions",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
