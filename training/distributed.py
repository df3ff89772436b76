"""Process-group plumbing for `sowa train` under `torchrun`: one process per device, gloo on CPU, NCCL on GPUs.

Launched plainly, the same code runs as a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.device import resolve_device

__all__ = ["World", "all_reduce_mean", "barrier", "setup_world", "teardown_world"]


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup_world(device: str = "auto") -> World:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and join the process group if there is one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # torchrun: one GPU per process on each node
    if size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank, local_rank, size, dev)


def teardown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_mean(world: World, values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the ranks (the tensor itself when alone)."""
    if not world.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world.size
