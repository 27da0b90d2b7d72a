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
    rank, size, local = launch_environment()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise VggspecError(f"LOCAL_RANK={local}, but torch sees {torch.cuda.device_count()} CUDA device(s)",
                               hint="start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    # torchrun sets these; a launch of one process joins a group too, so its path (DDP, nccl) is the real one.
    launched = size > 1 or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local, dev, launched)


LAUNCH_HINT = ("start several processes with `torchrun --nproc-per-node N -m vggspec train ...`, which sets them "
               "all; for one process, unset RANK, WORLD_SIZE and LOCAL_RANK")


def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise VggspecError(f"{name}={text!r} is not a whole number", hint=LAUNCH_HINT) from None
    if value < low:
        raise VggspecError(f"{name}={value} must be at least {low}", hint=LAUNCH_HINT)
    return value


def launch_environment() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, checked: VggspecError naming the variable when
    one is not a number, a rank is outside the world, or a world of several processes lacks its rendezvous.
    A stale RANK=1 left in a shell would otherwise train as a rank that writes nothing."""
    size = _env_int("WORLD_SIZE", 1, 1)
    rank, local = _env_int("RANK", 0, 0), _env_int("LOCAL_RANK", 0, 0)
    if "WORLD_SIZE" not in os.environ and "RANK" in os.environ and rank != 0:
        raise VggspecError(f"RANK={rank} is set without WORLD_SIZE: alone, this process would be rank {rank} of 1 "
                           "(left over from another launch?)", hint=LAUNCH_HINT)
    if rank >= size:
        raise VggspecError(f"RANK={rank} is outside WORLD_SIZE={size} (ranks run from 0 to {size - 1})",
                           hint=LAUNCH_HINT)
    if size > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k, "").strip()]
        if missing:
            raise VggspecError(f"WORLD_SIZE={size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                               "not set: the processes cannot find each other", hint=LAUNCH_HINT)
    return rank, size, local


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
