"""A vector quantiser whose codebook follows exponential moving averages of the vectors assigned to it.

The codebook lives in buffers (not parameters): it is updated by the EMA rule in training mode, never by the
optimiser. The encoder learns through the straight-through estimator and the commitment loss. Codes that stop
being used are restarted at random encoder outputs, so the codebook stays in use. The first training batch
initialises the codebook from its own encoder outputs. Under torch.distributed the EMA statistics are summed
over ranks, so every rank holds the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["EMAQuantizer", "QuantizerOutput"]


@dataclass
class QuantizerOutput:
    """quantized: (B, D, h, w) with straight-through gradients; codes: (B, h, w) int64; commitment: scalar."""

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class EMAQuantizer(nn.Module):
    """Nearest-neighbour (L2) quantisation against K codes of dimension D, with EMA codebook updates.

    Args:
        num_codes: K.
        dim: D.
        decay: EMA decay of cluster sizes and sums.
        epsilon: Laplace smoothing of cluster sizes.
        dead_code_threshold: restart codes whose EMA cluster size is below this (0 disables restarts).
    """

    def __init__(
        self, num_codes: int, dim: int, *, decay: float = 0.99, epsilon: float = 1e-5, dead_code_threshold: float = 0.5
    ) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold
        codebook = torch.randn(num_codes, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of ``codes`` (B, h, w) as a (B, D, h, w) tensor."""
        return self.codebook[codes].permute(0, 3, 1, 2)

    def soft_lookup(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability-weighted average of codebook vectors: probs (B, h, w, K) -> (B, D, h, w)."""
        return torch.einsum("bhwk,kd->bdhw", probs, self.codebook)

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (M, D) -> (M,)."""
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)
        return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor, *, update: bool | None = None) -> QuantizerOutput:
        """Quantise encoder outputs ``z`` (B, D, h, w). ``update`` (default: ``self.training``) runs the EMA step."""
        update = self.training if update is None else update
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if update and not bool(self.initialized):
            self._initialize(flat.detach())
        codes = self.assign(flat.detach())
        quantized = self.codebook[codes]
        if update:
            self._ema_update(flat.detach(), codes)
            quantized = self.codebook[codes]
        commitment = F.mse_loss(flat, quantized.detach())
        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        return QuantizerOutput(
            quantized=quantized.view(b, h, w, d).permute(0, 3, 1, 2),
            codes=codes.view(b, h, w),
            commitment=commitment,
        )

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        picks = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        codebook = flat[picks].clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(codebook, src=0)
        self.codebook.copy_(codebook)
        self.embed_sum.copy_(codebook)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.num_codes).type(flat.dtype)
        counts = _all_reduce(onehot.sum(0))
        sums = _all_reduce(onehot.t() @ flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            # only codes no vector of this batch uses: restarting a used one would change its vectors' targets
            dead = (self.cluster_size < self.dead_code_threshold) & (counts == 0)
            if bool(dead.any()):
                # Restart each dead code at a random encoder output of this batch (the same on every rank).
                picks = torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)
                fresh = flat[picks].clone()
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.broadcast(fresh, src=0)
                self.codebook[dead] = fresh
                self.embed_sum[dead] = fresh * self.dead_code_threshold
                self.cluster_size[dead] = self.dead_code_threshold
