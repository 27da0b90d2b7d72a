"""torch.distributed glue: read torchrun's environment, pick nccl or gloo, reduce numbers, only rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import VggspecError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # started by torchrun: in a process group (nccl or gloo), even when alone

    @property
    def main(self) -> bool:
        """Only rank 0 writes files and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group: collectives and DDP apply (under torchrun, even with one process)."""
        return self.launched


def setup(device: str = "auto") -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run alone."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise VggspecError("--device cuda, but torch sees no CUDA device", hint="use --device cpu or auto")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    # torchrun sets these; a launch of one process joins a group too, so its path (DDP, nccl) is the real one.
    launched = size > 1 or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local, dev, launched)


def teardown(world: World, finished: bool = True) -> None:
    """Leave the process group; after a finished run, all ranks together.

    A rank that tears its group down while rank 0 still writes the last checkpoint can abort in
    gloo's destructor ("terminate called without an active exception"). After a failure the other
    ranks may be stuck in a collective, so a failing rank leaves at once.
    """
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(world: World, *values: float) -> list[float]:
    """Sum numbers over ranks (float64 so counts stay exact); a no-op alone."""
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
