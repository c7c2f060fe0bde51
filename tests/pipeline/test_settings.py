"""Settings dataclasses are the one definition of the applications' options: the command line's options (names,
defaults, help, limits) are built from their fields, and the dataclasses check the same limits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from perceptio.cli._common import config_command
from perceptio.cli.main import app
from perceptio.config import ConfigError
from perceptio.experiments.spatial_cot import SpatialCotConfig
from perceptio.pipeline import check_limits
from perceptio.quickstart import QuickstartConfig


@dataclass(frozen=True)
class Example:
    out: Path = field(metadata={"help": "Where."})
    words: tuple[str, ...] = field(default=(), metadata={"help": "Positional words."})
    steps: int = field(default=3, metadata={"help": "Steps.", "min": 1, "max": 9})
    limit: int | None = field(default=None, metadata={"help": "At most N.", "min": 1})
    names: tuple[str, ...] = field(default=("a", "b"), metadata={"help": "Comma-separated names."})
    jobs: int = field(default_factory=lambda: 4, metadata={"help": "Jobs (default: 4).", "min": 1})

    def __post_init__(self) -> None:
        check_limits(self)


def _command() -> tuple[typer.Typer, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    example = typer.Typer(add_completion=False)

    @example.command()
    @config_command(Example, "words", "out", "steps", "limit", "names", "jobs", arguments=("words",))
    def run(settings: dict[str, Any], loud: bool = typer.Option(False, "--loud", help="Own option.")) -> None:
        seen.append({**settings, "loud": loud})
        Example(**settings)

    return example, seen


def test_options_come_from_the_fields_and_values_go_back_as_settings() -> None:
    example, seen = _command()
    runner = CliRunner()
    result = runner.invoke(example, ["--out", "o", "x=1", "y=2", "--steps", "9", "--names", "c, d", "--loud"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == {
        "out": Path("o"), "words": ("x=1", "y=2"), "steps": 9, "limit": None, "names": ("c", "d"), "loud": True,
    }  # fmt: skip
    assert "jobs" not in seen[-1]  # not given: the field's default factory decides
    assert runner.invoke(example, ["--out", "o", "--jobs", "2"]).exit_code == 0 and seen[-1]["jobs"] == 2
    for bad in (["--steps", "0"], ["--steps", "10"], ["--limit", "0"]):
        assert runner.invoke(example, ["--out", "o", *bad]).exit_code == 2
    assert runner.invoke(example, []).exit_code == 2  # --out has no default: required
    params = {p.name: p for p in typer.main.get_command(example).params}
    assert params["steps"].default == 3 and params["steps"].help == "Steps." and params["names"].default == "a,b"
    assert [p.name for p in typer.main.get_command(example).params] == [
        "words", "out", "steps", "limit", "names", "jobs", "loud",
    ]  # fmt: skip


def test_the_dataclasses_refuse_what_the_options_refuse() -> None:
    with pytest.raises(ConfigError, match=r"Example.steps must be <= 9, got 10 \(Steps.\)"):
        Example(out=Path("o"), steps=10)
    with pytest.raises(ConfigError, match=r"QuickstartConfig.num_images must be >= 10, got 9"):
        QuickstartConfig(num_images=9)
    with pytest.raises(ConfigError, match=r"baseline_steps must be >= 0, got -1 \(.*0: skip it\)"):
        QuickstartConfig(baseline_steps=-1)
    with pytest.raises(ConfigError, match="SpatialCotConfig.seeds must be >= 1"):
        SpatialCotConfig(out=Path("o"), seeds=0)


@pytest.mark.parametrize(
    ("words", "config"), [(["quickstart"], QuickstartConfig), (["experiment", "spatial-cot"], SpatialCotConfig)]
)
def test_the_commands_options_are_their_config_fields(words: list[str], config: type) -> None:
    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]  # type: ignore[attr-defined]
    fields = {spec.name: spec for spec in dataclasses.fields(config)}
    generated = [param for param in command.params if param.name in fields]
    assert len(generated) >= 10
    for param in generated:
        spec = fields[param.name]
        assert param.help == spec.metadata["help"], param.name
        if spec.default is not dataclasses.MISSING and not isinstance(spec.default, tuple):
            assert param.default == spec.default, param.name
        if "min" in spec.metadata:
            assert param.min == spec.metadata["min"], param.name
