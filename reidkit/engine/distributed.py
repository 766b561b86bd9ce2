"""A process's place in a `torchrun` job (rank, world size, device), for training and extraction."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in a `torchrun` job (world size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True outside `torchrun`, and in its rank 0: the process that prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed() -> Distributed:
    """Read torchrun's environment and join the process group (NCCL on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def process_device(place: Distributed) -> torch.device:
    """The GPU of this process's local rank, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", place.local_rank)
    return torch.device("cpu")
