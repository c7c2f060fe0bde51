"""Typed recipe loading: strict keys with suggestions, type checks, overrides, and the run record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from perceptio.config import ConfigError, load_config, parse_overrides, write_run_record


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    warmup_steps: int = 10
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    precision: Literal["fp32", "bf16"] = "fp32"
    optim: Optim = field(default_factory=Optim)
    weights: dict[str, float] = field(default_factory=dict)
    out_dir: Path = Path("runs/x")
    max_steps: int | None = None


def _recipe(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def test_recipe_and_overrides_build_typed_config(tmp_path: Path) -> None:
    path = _recipe(tmp_path, {"name": "tiny", "optim": {"lr": 0.001, "betas": [0.9, 0.98]}, "weights": {"refseg": 2}})
    config = load_config(Recipe, path, ["optim.warmup_steps=5", "precision=bf16", "max_steps=100", "out_dir=/tmp/r"])
    assert config == Recipe(
        name="tiny",
        precision="bf16",
        optim=Optim(lr=0.001, warmup_steps=5, betas=(0.9, 0.98)),
        weights={"refseg": 2.0},
        out_dir=Path("/tmp/r"),
        max_steps=100,
    )
    assert load_config(Recipe) == Recipe()


@pytest.mark.parametrize(
    ("payload", "overrides", "message"),
    [
        ({"optim": {"warmup_step": 3}}, [], "unknown key 'optim.warmup_step'; did you mean 'warmup_steps'?"),
        (
            {"optim": {"learning_rate": 1e-3}},
            [],
            "unknown key 'optim.learning_rate'; valid keys: betas, lr, warmup_steps",
        ),
        ({"optimizer": {}}, [], "unknown key 'optimizer'; did you mean 'optim'?"),
        ({}, ["optim.warmup_steps=ten"], "optim.warmup_steps: expected an integer, got 'ten'"),
        ({}, ["precision=fp16"], "precision: 'fp16' is not one of ['fp32', 'bf16']"),
        ({}, ["optim.lr=-1"], "optim: lr must be positive, got -1.0"),
        ({"optim": {"betas": [0.9]}}, [], "optim.betas: expected 2 values, got 1"),
        ({}, ["optim.lr"], "is not key=value"),
    ],
)
def test_bad_recipes_name_the_key_and_the_fix(
    tmp_path: Path, payload: dict, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, _recipe(tmp_path, payload), overrides)
    assert message in str(err.value)
    if "key=value" not in message:  # errors about the recipe's content name the recipe file
        assert str(tmp_path / "recipe.yaml") in str(err.value)


def test_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(Recipe, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Recipe, bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Recipe, bad)


def test_parse_overrides_nests_and_types() -> None:
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=true", "e=x"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": True,
        "e": "x",
    }


def test_run_record(tmp_path: Path) -> None:
    config = load_config(Recipe, None, ["name=recorded"])
    path = write_run_record(tmp_path / "run", config)
    assert yaml.safe_load(path.read_text())["name"] == "recorded"
    assert load_config(Recipe, path) == config  # the record reloads into the same config
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["packages"]["torch"].startswith("2.") and environment["python"].startswith("3.11")
    assert environment["git_revision"] is None or len(environment["git_revision"]) >= 40
