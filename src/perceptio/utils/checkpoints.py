"""Checkpoints of resumable jobs (Perceptio, depth-tokenizer and SAM2 training): writing, reading, choosing one.

A job writes ``<out>/checkpoints/step-NNNNNNN`` folders. Each holds:

* ``trainable.safetensors``: every trainable parameter (frozen ones are rebuilt from the job's settings), tied
  ones once (``aliases.json`` names the others), and the module's buffers when the job asks for them (a
  codebook kept as a running average trains without being a parameter);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimiser's moments by parameter name, and its groups;
* ``trainer_state.json``: the step and whatever else the job needs to resume (its settings, a data digest).

Nothing else is needed to resume exactly when the learning rate is a function of the step and every random draw
derives from ``(seed, step)``. The folder is written under a temporary name and renamed when complete, so a run
killed at any moment leaves only whole checkpoints; the newest ``keep`` are kept. Tensors are gathered with
``torch.distributed.checkpoint.state_dict``, which also handles DDP and FSDP models.

A finished checkpoint can still be unusable: a disk that lost the end of a file, a copy cut short, or weights
that produced a non-finite loss. :func:`latest_checkpoint` returns the newest *intact* one and says which newer
ones it passed over and why; :func:`set_aside` renames a checkpoint known to be bad (``bad-step-NNNNNNN``, with
the reason in ``REASON.txt``) so that no resume picks it, while its files stay for inspection.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from perceptio.utils.weights_files import CorruptWeightsError, check_safetensors_file, with_user_umask

__all__ = [
    "checkpoint_problem",
    "checkpoint_step",
    "gather_state",
    "last_good_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "set_aside",
]

logger = logging.getLogger(__name__)


def checkpoint_step(folder: Path) -> int:
    """The step of a ``step-NNNNNNN`` folder, from its name."""
    return int(folder.name.removeprefix("step-"))


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be resumed from (in words, naming the file), or None when it is intact: every JSON
    file parses, ``trainer_state.json`` holds the step, and every safetensors file is whole (header and sizes; no
    tensor is read)."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing (the checkpoint was not finished)"
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path} is empty or not whole JSON ({path.stat().st_size} bytes)"
        if path == state and not (isinstance(payload, dict) and isinstance(payload.get("step"), int)):
            return f"{path} holds no step"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors_file(path)
        except CorruptWeightsError as err:
            return str(err)
    return None


def latest_checkpoint(out_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest intact checkpoint under ``out_dir/checkpoints`` (None if there is none). Newer ones that are
    damaged are passed over, each with a warning that names it and what is wrong."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.glob("step-*"), reverse=True):
        if not candidate.is_dir() or not candidate.name.removeprefix("step-").isdigit():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if warn and (candidate / "trainer_state.json").is_file():  # an unfinished one is normal after a kill
            logger.warning("checkpoint %s is damaged and is passed over: %s", candidate, problem)
    return None


def set_aside(folder: Path, reason: str) -> Path:
    """Rename checkpoint ``folder`` to ``bad-<name>`` (replacing an older one of that name) and write ``reason``
    into its ``REASON.txt``; returns the new path."""
    target = folder.with_name(f"bad-{folder.name}")
    if target.exists():
        shutil.rmtree(target)
    folder.rename(target)
    (target / "REASON.txt").write_text(reason.rstrip() + "\n")
    return target


def last_good_checkpoint(out_dir: str | Path, failed_step: int) -> Path | None:
    """After a non-finite loss at ``failed_step``: set aside every checkpoint of that step or later (the weights
    that produced the loss), and return the newest intact one left, the state a resume continues from."""
    folder = Path(out_dir) / "checkpoints"
    if folder.is_dir():
        for candidate in sorted(folder.glob("step-*")):
            if candidate.name.removeprefix("step-").isdigit() and checkpoint_step(candidate) >= failed_step:
                set_aside(candidate, f"its weights gave a non-finite loss at step {failed_step}")
    return latest_checkpoint(out_dir)


_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_SEP = "::"
_FILES = ("trainable.safetensors", "aliases.json", "optimizer.safetensors", "optimizer.json")


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, buffers: bool = False) -> tuple[dict, dict]:
    """Full (unsharded, CPU) trainable weights (and, with ``buffers``, the module's persistent buffers) and
    optimiser state, keyed by name. Collective under FSDP: every rank must call it."""
    weights = get_model_state_dict(model, options=_GATHER)
    kept = _saved_names(model, buffers)
    if weights:  # empty on the non-main ranks under FSDP's CPU offload
        weights = {name: value for name, value in weights.items() if name in kept}
    optim = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    return weights, optim


def _saved_names(model: nn.Module, buffers: bool) -> set[str]:
    """Names (as the state-dict functions spell them) of every parameter that trains, under any of its aliases
    (a frozen matrix shared under a second name, a tied LM head, is left out), and with ``buffers`` every
    persistent buffer."""
    names = {
        name.removeprefix("module.")
        for name, param in model.named_parameters(remove_duplicate=False)
        if param.requires_grad
    }
    if buffers:
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        names |= {name.removeprefix("module.") for name in model.state_dict() if name not in parameters}
    return names


def save_checkpoint(out_dir: Path, step: int, weights: dict, optim: dict, state: dict[str, Any], *, keep: int) -> Path:
    """Write a checkpoint from :func:`gather_state`'s output (call on one process only)."""
    folder = Path(out_dir) / "checkpoints"
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # tied weights (an LM head tied to the embeddings) are stored once
    owners: dict[tuple, str] = {}
    for name, value in weights.items():
        if value.numel() == 0:
            unique[name] = value.detach().contiguous()
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if key in owners:
            aliases[name] = owners[key]
        else:
            owners[key] = name
            unique[name] = value.detach().contiguous()
    save_file(unique, str(tmp / "trainable.safetensors"))
    (tmp / "aliases.json").write_text(json.dumps(aliases, indent=1))
    moments = {
        f"{name}{_SEP}{slot}": value.detach().reshape(value.shape).contiguous()
        for name, slots in optim["state"].items()
        for slot, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(moments, str(tmp / "optimizer.safetensors"))
    with_user_umask(tmp)
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optim["param_groups"]]
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, buffers: bool = False
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (``buffers`` as given to :func:`gather_state`); returns the
    trainer state."""
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} has no {', '.join(missing)}: it is not a checkpoint of this version (depth-tokenizer "
            "checkpoints used another layout before); continue from a newer checkpoint or start again"
        )
    weights = load_file(str(folder / "trainable.safetensors"))
    for alias, owner in json.loads((folder / "aliases.json").read_text()).items():
        weights[alias] = weights[owner]
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    expected &= _saved_names(model, buffers)
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{folder}: the checkpoint's trainable parameters differ from this model's (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); resume with the settings (model and trainable policy) that wrote it"
        )
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    wrong = [
        f"{n} (checkpoint {list(v.shape)}, model {list(shapes[n])})"
        for n, v in weights.items()
        if n in shapes and tuple(v.shape) != shapes[n]
    ]
    if wrong:
        raise ValueError(
            f"{folder}: the checkpoint's tensors do not fit this model: {', '.join(wrong[:5])}; resume with the "
            "settings (model architecture) that wrote it"
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    moments = load_file(str(folder / "optimizer.safetensors"))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, slot = key.rsplit(_SEP, 1)
        state.setdefault(name, {})[slot] = value
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    # not strict: a parameter that trains but never got a gradient (an unused prompt path) has no moments yet,
    # in the checkpoint as in the uninterrupted run
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    return json.loads((folder / "trainer_state.json").read_text())
