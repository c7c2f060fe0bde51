"""The README's commands and Python examples match the code: every `perceptio` command names a command that
exists and only options it takes, every `make` target exists, and every Python example imports what it names."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import typer

from perceptio.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _resolve(words: list[str]) -> tuple[object, list[str], str]:
    """The command a `perceptio ...` line runs (typer's click-style object), the words after it, and its name."""
    command = typer.main.get_command(app)
    name = "perceptio"
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        assert sub is not None, f"`{name} {words[0]}` is not a command"
        command, name, words = sub, f"{name} {words[0]}", words[1:]
    return command, words, name


def test_the_readme_has_commands_and_examples_to_check() -> None:
    assert len([c for c in _commands() if "perceptio" in c[:4]]) >= 15 and len(_blocks("python")) >= 3


def test_every_perceptio_command_and_option_in_the_readme_exists() -> None:
    checked = 0
    for words in _commands():
        if "perceptio" not in words[:4]:
            continue
        start = words.index("perceptio") + 1
        command, rest, name = _resolve(words[start:])
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for word in rest:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"`{name}` has no option {word} (README: {' '.join(words)})"
        checked += 1
    assert checked >= 15


def test_every_make_target_in_the_readme_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    used = {c[1] for c in _commands() if c[0] == "make"} | set(re.findall(r"`make ([\w-]+)`", README))
    assert used and used <= targets, used - targets


def test_every_python_example_imports_what_it_names() -> None:
    for block in _blocks("python"):
        tree = ast.parse(block)  # the example is valid Python
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("perceptio"):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{node.module} has no {missing}"
