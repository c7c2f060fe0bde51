"""Training checkpoints: trainable weights and optimiser state as safetensors, the rest as JSON, written atomically.

A checkpoint folder ``checkpoints/step-NNNNNNN`` holds:

* ``trainable.safetensors``: every trainable parameter (frozen ones are rebuilt from the recipe's model source),
  tied ones once (``aliases.json`` names the others);
* ``optimizer.safetensors`` + ``optimizer.json``: AdamW's moments by parameter name, and its parameter groups;
* ``trainer_state.json``: the step, the resolved recipe and a digest of the training data.

Nothing else is needed to resume exactly: the learning rate is a function of the step, and every random draw
(data order, phrasings, dropout) derives from ``(seed, step)``. The folder is written under a temporary name and
renamed when complete, so a run killed at any moment leaves only whole checkpoints; the newest ``keep`` are kept.
Tensors are gathered with ``torch.distributed.checkpoint.state_dict``, which also handles DDP and FSDP models.
"""

from __future__ import annotations

import json
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

from perceptio.utils.checkpoints import latest_checkpoint
from perceptio.utils.weights_files import with_user_umask

__all__ = ["gather_state", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_SEP = "::"


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) trainable weights and optimiser state, keyed by parameter name. Collective under
    FSDP: every rank must call it."""
    weights = get_model_state_dict(model, options=_GATHER)
    trainable = _trainable_names(model)
    if weights:  # empty on the non-main ranks under FSDP's CPU offload
        weights = {name: value for name, value in weights.items() if name in trainable}
    optim = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    return weights, optim


def _trainable_names(model: nn.Module) -> set[str]:
    """Names (as the state-dict functions spell them) of every parameter that trains, under any of its aliases:
    a frozen matrix shared under a second name (a tied LM head) is left out."""
    return {
        name.removeprefix("module.")
        for name, param in model.named_parameters(remove_duplicate=False)
        if param.requires_grad
    }


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


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable weights and optimiser state saved by :func:`save_checkpoint`; returns the trainer state."""
    weights = load_file(str(folder / "trainable.safetensors"))
    for alias, owner in json.loads((folder / "aliases.json").read_text()).items():
        weights[alias] = weights[owner]
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    expected &= _trainable_names(model)
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{folder}: the checkpoint's trainable parameters differ from this model's (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); resume with the recipe (model and trainable policy) that wrote it"
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
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )
    return json.loads((folder / "trainer_state.json").read_text())
