"""Data-parallel training across processes with PyTorch's own engine (``torch.distributed``).

Started by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``), training runs one
process per GPU (NCCL) or per CPU share (gloo) and wraps the network in
:class:`~torch.nn.parallel.DistributedDataParallel`. Without those variables everything below is a
no-op for one process, so the same code trains on one device.

What keeps a run correct across processes:

* **Sampling**: every rank draws the same epoch order (seeded by seed and epoch, as in one
  process), pads it to a multiple of the world size and takes every ``world``-th index from its
  rank on (:func:`shard`). With the per-rank batch ``batch_size / world``, step ``s`` of all ranks
  together trains on exactly the images of step ``s`` of a one-process run, so the region x label
  balanced draw and the natural epochs keep their meaning.
* **Early stopping**: each rank scores its shard of the tuning images; the scores are gathered in
  the original order (:func:`gather_scores`), so every rank computes the same AUC and takes the
  same decision without further messages.
* **Checkpoints**: only rank 0 writes (``last.pt``, ``best.safetensors``, the history and the
  export); every rank reads ``last.pt`` on ``--resume``; a barrier separates the two.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (size 1: no distribution)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (even as its only process)

    @property
    def distributed(self) -> bool:
        """Whether this process is one of a process group: several processes, or one started by
        ``torchrun`` (so a single-GPU run takes the same DDP and collective path as eight)."""
        return self.size > 1 or self.launched

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0


SINGLE = World()


def world_from_env() -> World:
    """The world ``torchrun`` describes in the environment (one process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {size}")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < size:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return World(rank=rank, size=size, local_rank=local, launched="WORLD_SIZE" in os.environ)


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group and return this rank's device: NCCL for the CUDA tensors (the
    gradients), gloo for the CPU ones (gathered scores, logged losses), gloo alone on the CPU."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    return device


def stop(world: World) -> None:
    """Leave the process group (after a last barrier)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def per_rank_batch(batch_size: int, world: World) -> int:
    """The batch each rank takes so that all ranks together take ``batch_size`` per step."""
    if batch_size % world.size:
        raise ValueError(
            f"training.batch_size {batch_size} must be a multiple of the {world.size} processes "
            "(it is the batch of all processes together)"
        )
    return batch_size // world.size


def shard(order: np.ndarray, world: World) -> np.ndarray:
    """This rank's part of an epoch's order: padded (with its first indices, as
    ``DistributedSampler`` does) to a multiple of the world size, then every ``size``-th index
    from ``rank`` on; every rank gets the same number of samples, so no rank waits at the end."""
    if not world.distributed:
        return order
    pad = (-len(order)) % world.size
    padded = np.concatenate([order, order[:pad]]) if pad else order
    return padded[world.rank :: world.size]


def gather_scores(local: np.ndarray, total: int, world: World) -> np.ndarray:
    """The scores of all ranks' shards of ``total`` items, back in the original order
    (each rank scored ``shard(arange(total))``; the padding is dropped)."""
    if not world.distributed:
        return local
    per_rank = -(-total // world.size)
    mine = torch.full((per_rank,), float("nan"), dtype=torch.float64)
    mine[: len(local)] = torch.from_numpy(np.asarray(local, dtype=np.float64))
    parts = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(parts, mine)
    # rank r holds items r, r + size, r + 2 size, ...: interleave back
    stacked = torch.stack(parts, dim=1).reshape(-1)  # item k*size + r at position k*size + r
    return stacked[:total].numpy()


def all_max(value: float, world: World) -> float:
    """The largest ``value`` over the ranks (e.g. elapsed time, so all stop together)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_mean(values: Sequence[float] | np.ndarray, world: World) -> np.ndarray:
    """The element-wise mean of ``values`` over the ranks (for logging losses)."""
    array = np.asarray(values, dtype=np.float64)
    if not world.distributed:
        return array
    tensor = torch.from_numpy(array.copy())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.numpy() / world.size
