# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Spreading the pairs of a datalist over the ranks of a ``torchrun`` launch, and gathering their results on rank 0.

The pairs are dealt round-robin over the datalist order (pair ``i`` belongs to rank ``i % world_size``): each pair has
exactly one owner whatever is already done, no rank needs to talk to another before it starts, uneven counts simply
give some ranks one pair more, and a run resumed with another number of ranks still does every pair once. The only
communication is the final gather of small Python objects (the per-pair summary rows), so the process group uses gloo
on CPU and GPU machines alike (no NCCL initialisation or GPU memory for it) and works across nodes with torchrun's usual
rendezvous arguments.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from scripts.io.errors import RegistrationInputError

__all__ = [
    "distributed_context",
    "shard_indices",
    "rank_device",
    "init_distributed",
    "close_distributed",
    "gather_to_main",
    "check_launch",
]

logger = logging.getLogger(__name__)


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(count: int, rank: int, world_size: int) -> list[int]:
    """Indices of ``range(count)`` owned by ``rank``: ``rank, rank + world_size, ...`` (uneven counts allowed).

    Raises:
        ValueError: a negative count, ``world_size < 1`` or a rank outside ``[0, world_size)``.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}.")
    return list(range(rank, count, world_size))


def rank_device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Raises:
        RegistrationInputError: more ranks on this node than GPUs.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RegistrationInputError(
            f"rank with LOCAL_RANK={local_rank} has no GPU: this node has {count}; expected one GPU per rank. Launch "
            f"with torchrun --nproc_per_node {count} (or fewer)."
        )
    return torch.device(f"cuda:{local_rank}")


def init_distributed(backend: str = "gloo", timeout_minutes: float = 24 * 60) -> bool:
    """Join the process group that torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ... set by it).

    Args:
        backend: ``"gloo"`` (default: the group only gathers Python objects) or ``"nccl"``.
        timeout_minutes: how long a rank that finished its pairs waits for the slowest one at the final gather (ranks
            of a long cohort may finish hours apart; torch's default of 30 minutes would abort them).

    Returns:
        True (so that configs can use it in an ``initialize`` expression).
    """
    if timeout_minutes <= 0:
        raise ValueError(f"timeout_minutes must be > 0, got {timeout_minutes}.")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=float(timeout_minutes)))
        rank, world = distributed_context()
        logger.info("rank %d of %d joined the process group (%s).", rank, world, backend)
    return True


def close_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Collect one picklable object from every rank: the list (by rank) on rank 0, None elsewhere; ``[obj]`` without a
    process group. Every rank must call it (a collective)."""
    rank, world = distributed_context()
    if world == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def check_launch() -> None:
    """Refuse a launch by torchrun (``WORLD_SIZE`` > 1) without a process group: every rank would register every pair.

    Raises:
        RegistrationInputError: naming the config to add.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RegistrationInputError(
            f"launched as {world} processes (WORLD_SIZE={world}) without a process group: each would register every "
            "pair. Add configs/multi_gpu_inference.json to the config list: --config_file "
            "\"['configs/inference.json','configs/multi_gpu_inference.json']\"."
        )
