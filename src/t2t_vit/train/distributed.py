"""DDP glue: process group from torchrun's environment, a resumable sharded sampler, reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from t2t_vit.errors import T2TViTError
from t2t_vit.runtime import default_device


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str = "auto") -> World:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single process.

    NCCL on GPUs, gloo on CPU. Each process uses the GPU of its ``LOCAL_RANK``.
    """
    size, rank, local_rank = _env_int("WORLD_SIZE", 1, 1), _env_int("RANK", 0, 0), _env_int("LOCAL_RANK", 0, 0)
    if rank >= size:
        raise T2TViTError(f"the environment variable RANK={rank} must be below WORLD_SIZE={size}")
    if device == "auto":
        device = default_device()
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def _env_int(name: str, default: int, low: int) -> int:
    """A whole number >= ``low`` from torchrun's environment; a bad value is one line, not a traceback."""
    text = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise T2TViTError(f"the environment variable {name}={text!r} must be a whole number >= {low} "
                          "(torchrun sets it; unset it for a single process)")
    return value


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: float, world: World) -> float:
    """The largest ``value`` over all ranks (a signal number, so every rank stops for the same one)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def broadcast_flag(value: bool, world: World) -> bool:
    """True on every rank if it is true on any rank (used to stop all ranks together)."""
    return bool(all_reduce_sum([float(value)], world)[0] > 0)


class ShardedSampler(Sampler[int]):
    """Shuffled (seed + epoch) indices, trimmed to whole global batches, rank r taking every
    ``size``-th one, so global batch b holds the same samples for any number of processes.
    ``set_epoch(epoch, skip_batches)`` resumes inside an epoch without loading the skipped data.
    """

    def __init__(self, length: int, world: World, batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        self.length, self.world, self.batch_size = length, world, batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.length))
        if self.drop_last:
            per_step = self.batch_size * self.world.size
            order = order[: (self.length // per_step) * per_step]
        mine = order[self.world.rank :: self.world.size]
        return mine[self.skip * self.batch_size :]

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.length // (self.batch_size * self.world.size)
        per_rank = -(-self.length // self.world.size)
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())
