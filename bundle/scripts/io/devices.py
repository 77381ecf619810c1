# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Which device to run on: a user's device string checked against the machine before anything runs."""

from __future__ import annotations

import re

import torch

from scripts.io.errors import RegistrationInputError

__all__ = ["DEVICE_PATTERN", "available_devices", "check_device_name", "resolve_device"]

#: the device strings a user may give: "cpu", "cuda", "cuda:N" (and "auto" = CUDA when available, else CPU)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def available_devices() -> list[str]:
    """The devices this machine offers, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(count)]


def check_device_name(name: object) -> str:
    """
    The canonical form of a device string, checked for its form only (not against the machine).

    Args:
        name: "auto", "cpu", "cuda" or "cuda:N" (case and surrounding spaces ignored), or a ``torch.device``.

    Returns:
        the lower-case string, e.g. ``"cuda:1"``.

    Raises:
        RegistrationInputError: anything else (e.g. "gpu", "mps", "cuda:x", or text meant as code).
    """
    text = str(name).strip().lower() if isinstance(name, (str, torch.device)) else None
    if text is None or not DEVICE_PATTERN.match(text):
        raise RegistrationInputError(
            f"device {name!r} is not a device name; expected 'cpu', 'cuda' or 'cuda:N' (N = GPU index); "
            f"available: {', '.join(available_devices())}."
        )
    return text


def resolve_device(name: object = "auto") -> torch.device:
    """
    The ``torch.device`` for a user's device string, after checking that this machine has it.

    Args:
        name: "auto" or None (CUDA when available, else CPU), "cpu", "cuda" (the current GPU) or "cuda:N",
            or a ``torch.device``.

    Returns:
        the device.

    Raises:
        RegistrationInputError: a malformed name, or a CUDA device this machine does not have; the message names what
        was asked and what exists (e.g. ``device 'cuda' was requested, but CUDA is not available on this machine
        (torch 2.13.0+cpu); available: cpu``).

    Example::

        resolve_device("cuda:1")  # torch.device("cuda:1") on a machine with 2 GPUs, else RegistrationInputError
    """
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
