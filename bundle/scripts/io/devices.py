# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Where a run computes: a user's device string, checked against the machine before anything runs, and the ranks of a
``torchrun`` launch (joining the process group with ``ignite.distributed``, the device of each rank, and the share of a
cohort's pairs each rank registers).

The pairs still to register are dealt round-robin (pair ``i`` of that list to rank ``i % world_size``,
``monai.data.partition_dataset`` without padding): each pair has exactly one owner, uneven counts simply give some ranks
one pair more, and a run resumed with another number of ranks still does every pair once. The ranks only exchange small
Python objects (the pairs to register, the summary rows), so the process group uses gloo on CPU and GPU machines alike
(no NCCL initialisation or GPU memory for it) and works across nodes with torchrun's usual rendezvous arguments.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
from monai.data import partition_dataset

from scripts.io.errors import RegistrationInputError

logger = logging.getLogger(__name__)

#: the device strings a user may give: "cpu", "cuda", "cuda:N" (and "auto" = CUDA when available, else CPU)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def available_devices() -> list[str]:
    """The devices this machine offers, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(count)]


def check_device_name(name: object) -> str:
    """The lower-case form of a device string ("auto", "cpu", "cuda", "cuda:N" or a ``torch.device``; case and
    surrounding spaces ignored), checked for its form only; RegistrationInputError for anything else ("gpu", "mps",
    "cuda:x", text meant as code)."""
    text = str(name).strip().lower() if isinstance(name, (str, torch.device)) else None
    if text is None or not DEVICE_PATTERN.match(text):
        raise RegistrationInputError(
            f"device {name!r} is not a device name; expected 'cpu', 'cuda' or 'cuda:N' (N = GPU index); "
            f"available: {', '.join(available_devices())}."
        )
    return text


def resolve_device(name: object = "auto") -> torch.device:
    """The ``torch.device`` for a user's device string ("auto" or None: CUDA when available, else CPU; "cpu"; "cuda",
    the current GPU; "cuda:N"; or a ``torch.device``), after checking that this machine has it: RegistrationInputError
    naming what was asked and what exists (``device 'cuda' was requested, but CUDA is not available on this machine
    (torch 2.13.0+cpu, a CPU-only build); available: cpu``)."""
    text = "auto" if name is None else check_device_name(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    available = available_devices()
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no usable GPU"
        raise RegistrationInputError(
            f"device '{text}' was requested, but CUDA is not available on this machine (torch {torch.__version__}, "
            f"{build}); available: {', '.join(available)}. Use --device cpu, or leave --device out to pick CUDA "
            "only when it is there."
        )
    if text != "cuda" and text not in available:
        raise RegistrationInputError(
            f"device '{text}' was requested, but this machine has {len(available) - 1} CUDA device(s); available: "
            f"{', '.join(available)}."
        )
    return torch.device(text)


def rank_share(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The items that ``rank`` of ``world_size`` owns: ``items[rank::world_size]`` (ValueError for a rank outside
    ``[0, world_size)``). ``partition_dataset`` refuses fewer items than ranks (the last pairs of a resumed cohort):
    then the first ranks get one item each and the others none."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}.")
    if len(items) < world_size:
        return list(items[rank : rank + 1])
    return partition_dataset(list(items), num_partitions=world_size, shuffle=False, even_divisible=False)[rank]


def rank_device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is available (RegistrationInputError when the node has
    fewer GPUs than ranks), else the CPU."""
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
    """Join the process group that torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ... set by it) with
    ``backend`` (gloo: the group only exchanges Python objects); True, for a config's ``initialize`` expression.
    ``timeout_minutes``: how long a rank that finished its pairs waits for the slowest one at the final gather (ranks
    of a long cohort may finish hours apart; torch's default of 30 minutes would abort them)."""
    if timeout_minutes <= 0:
        raise ValueError(f"timeout_minutes must be > 0, got {timeout_minutes}.")
    if not torch.distributed.is_initialized():
        idist.initialize(backend, timeout=datetime.timedelta(minutes=float(timeout_minutes)))
        logger.info("rank %d of %d joined the process group (%s).", idist.get_rank(), idist.get_world_size(), backend)
    return True


def close_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        idist.finalize()


def check_launch() -> None:
    """Refuse a launch by torchrun (``WORLD_SIZE`` > 1) without a process group, where every rank would register every
    pair (RegistrationInputError naming the config to add)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RegistrationInputError(
            f"launched as {world} processes (WORLD_SIZE={world}) without a process group: each would register every "
            "pair. Add configs/multi_gpu_inference.json to the config list: --config_file "
            "\"['configs/inference.json','configs/multi_gpu_inference.json']\"."
        )
