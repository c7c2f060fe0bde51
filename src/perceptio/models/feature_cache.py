"""A bounded cache of a frozen encoder's outputs, keyed by the input's bytes.

SAM2's image encoder is frozen (and in eval mode) while Perceptio trains, so its features for an image are the
same at every step; a training run over a few thousand images computes each one many times. The cache keeps the
features of the most recently used images up to a byte budget and hands back the very tensors computed the first
time, so a step that hits it computes the same loss, to the bit, as one that does not.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

__all__ = ["FeatureCache"]


class FeatureCache:
    """Least-recently-used cache of ``encode(x)`` for single inputs ``x`` (a batch of one), within ``max_bytes``.

    Args:
        max_bytes: the budget for the cached tensors; an entry larger than it is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, tuple[tuple[torch.Tensor, ...], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(x: torch.Tensor) -> str:
        """The digest of ``x``'s shape, dtype and values."""
        data = x.detach().contiguous().cpu()
        digest = hashlib.blake2b(str((tuple(data.shape), data.dtype)).encode(), digest_size=16)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        return digest.hexdigest()

    def get(
        self, x: torch.Tensor, encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """``encode(x)``, from the cache when ``x`` was seen (then the stored tensors themselves)."""
        key = self.key(x)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        value = tuple(t.detach() for t in encode(x))
        size = sum(t.numel() * t.element_size() for t in value)
        if size <= self.max_bytes:
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
        return value
