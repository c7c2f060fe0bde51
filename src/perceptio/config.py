"""Typed run configurations: YAML recipes and ``key=value`` overrides loaded into nested dataclasses.

Loading is strict. An unknown key fails with the closest valid name; a value of the wrong type fails with the
field's dotted path and its type; the dataclasses' own ``__post_init__`` checks then reject impossible values.
:func:`write_run_record` stores the resolved configuration, package versions and the git revision in a run
directory, so every result can be traced to what produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import subprocess
import sys
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import yaml

from perceptio.errors import UserError

__all__ = ["ConfigError", "config_to_dict", "load_config", "parse_overrides", "write_run_record"]

T = TypeVar("T")
_RECORDED_PACKAGES = ("perceptio", "torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow")


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the configuration; the message names the key and the fix."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _convert(value: Any, hint: Any, path: str) -> Any:
    """Check/convert one value against a type hint (dataclasses, Optional/unions, tuples, lists, dicts, scalars)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {hint.__name__} fields, got {type(value).__name__}")
        return _build(hint, value, f"{path}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = typing.get_args(hint) or (Any, Any)
        return {_convert(k, key_type, path): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{path}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{path}: unsupported field type {hint!r}")


def _build(cls: type[T], payload: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in payload if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown key {prefix + key!r}" + _suggest(key, names))
    values = {k: _convert(v, hints[k], prefix + k) for k, v in payload.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=2e-5", "data.weights=[1, 2]"]`` -> a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (for example train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse the value ({err})") from None
        target = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        target[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if value and isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML recipe (optional) and ``key=value`` overrides (applied on top)."""
    payload: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"recipe not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        payload = loaded or {}
    payload = _merge(payload, parse_overrides(overrides or []))
    try:
        return _build(cls, payload)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def config_to_dict(config: Any) -> Any:
    """A JSON/YAML-safe nested dict of a config dataclass (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_run_record(run_dir: str | Path, config: Any) -> Path:
    """Write ``config.yaml`` (the resolved configuration) and ``environment.json`` (package versions, Python,
    git revision) into ``run_dir``; returns the path of the config file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    versions = {}
    for package in _RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    environment = {"python": sys.version.split()[0], "packages": versions, "git_revision": _git_revision()}
    (run_dir / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
    return config_path
