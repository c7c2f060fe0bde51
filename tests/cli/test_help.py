"""Every command's --help: it prints, flags show no value type, and the options say what they are."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from perceptio.cli.main import app


def _commands(command: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    if getattr(command, "commands", None):  # a group (typer vendors its own click)
        for name, sub in command.commands.items():
            found += _commands(sub, (*path, name))
    return found


def test_every_help_prints_and_flags_take_no_value() -> None:
    root = typer.main.get_command(app)
    paths = _commands(root)
    assert len(paths) > 15  # the root, its groups and their commands
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "160"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
        assert "Show this message and exit." in result.output, path
