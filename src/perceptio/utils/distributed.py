"""Processes under ``torchrun``: who this process is, and the one place the process group is set up.

``torchrun`` starts one process per device and tells each its place through ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``. Training and evaluation both call :func:`setup_distributed`; code that must act once per job
(the run lock, printing) asks :func:`is_main_process`, which reads the environment and works before the group
exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when the group is set up: the run lock asks is_main_process without it
    import torch

__all__ = ["Distributed", "is_main_process", "launched_by_torchrun", "setup_distributed"]


@dataclass(frozen=True)
class Distributed:
    """This process's rank, the number of processes, and the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes shared files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world > 1


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a lone process."""
    return not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0


def setup_distributed(requested: str | None = None) -> Distributed:
    """Join the job's process group (created on first use) and choose this process's device.

    Args:
        requested: ``"cpu"``, ``"cuda"`` or a device string; None takes CUDA when present. Under ``torchrun``
            with CUDA each process takes the GPU of its ``LOCAL_RANK``.

    The group pairs gloo with NCCL on GPUs: the logged sums and the replica checks are CPU tensors.
    """
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and requested != "cpu"
    if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        return Distributed(0, 1, torch.device(requested) if requested else torch.device("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), dist.get_world_size(), device)
