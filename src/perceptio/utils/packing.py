"""Every tensor of a nested structure in one buffer, for a cheap hand-over between processes.

A ``DataLoader`` worker hands each tensor of an item over in a shared-memory file of its own; receiving one
costs the training process about 0.2 ms, whatever its size (a file descriptor passed, a file mapped), so a
training batch of 26 tensors cost it about 9 ms per step. :func:`pack` copies every tensor of an item into one
byte buffer (in the worker); :func:`unpack` gives back the structure with each tensor a view of that buffer (in
the training process): the same values, dtypes and shapes, for the price of one tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Packed", "pack", "unpack"]

_ALIGN = 64  # every tensor starts on a cache line, so a view of any dtype is aligned


@dataclass
class Packed:
    """A structure whose tensors sit in ``buffer``: ``layout`` holds (offset, dtype, shape) per tensor, in the
    order ``skeleton`` (the structure with each tensor replaced by its index) names them."""

    buffer: torch.Tensor
    layout: list[tuple[int, torch.dtype, tuple[int, ...]]]
    skeleton: Any


@dataclass(frozen=True)
class _Slot:
    index: int


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.requires_grad:
            raise ValueError(
                f"pack takes CPU tensors without gradient, got one on {value.device} "
                f"(requires_grad={value.requires_grad})"
            )
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, dict):
        return {key: _strip(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(item, tensors) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _strip(getattr(value, f.name), tensors) for f in dataclasses.fields(value) if f.init}
        )
    return value


def _fill(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, dict):
        return {key: _fill(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(item, tensors) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _fill(getattr(value, f.name), tensors) for f in dataclasses.fields(value) if f.init}
        )
    return value


def pack(value: Any) -> Packed:
    """``value`` (tensors inside dicts, lists, tuples and dataclasses, at any depth) with its CPU tensors copied
    into one buffer."""
    tensors: list[torch.Tensor] = []
    skeleton = _strip(value, tensors)
    layout, size = [], 0
    for tensor in tensors:
        layout.append((size, tensor.dtype, tuple(tensor.shape)))
        size += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    buffer = torch.empty(size, dtype=torch.uint8)
    for tensor, (offset, _, _) in zip(tensors, layout, strict=True):
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + flat.numel()].copy_(flat)
    return Packed(buffer, layout, skeleton)


def unpack(packed: Packed) -> Any:
    """The structure :func:`pack` took, each tensor a view of ``packed.buffer``."""
    tensors = []
    for offset, dtype, shape in packed.layout:
        count = 1
        for side in shape:
            count *= side
        nbytes = count * dtype.itemsize
        tensors.append(packed.buffer[offset : offset + nbytes].view(dtype).view(shape))
    return _fill(packed.skeleton, tensors)
