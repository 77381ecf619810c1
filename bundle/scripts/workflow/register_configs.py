# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Which config files a registration merges, defined once: ``python -m scripts.cli register`` builds its list here, and
the MONAI Label and MONAI Deploy apps (``integrations/``) run the same default pipeline from it: the affine stage,
SACB-Net and the field refinement (``inference.json`` + ``refinement.json`` + ``affine.json``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_REGISTER_CONFIGS", "register_config_files", "register_config_names"]


def register_config_names(
    instance_optimization: bool = False, refinement: bool = True, affine: bool = True
) -> list[str]:
    """
    Names (file stems in ``configs/``) of the configs one registration merges, in merge order.

    Args:
        instance_optimization: add ``instance_optimization`` (fine-tune the network on the pair first).
        refinement: add ``refinement`` (refine the network's field on the pair).
        affine: add ``affine`` (the affine stage before the network, for scans in their own scanner spaces).

    Returns:
        ``["inference", ...]``; with the defaults (those of ``register``) ``["inference", "refinement", "affine"]``.
    """
    wanted = {"instance_optimization": instance_optimization, "refinement": refinement, "affine": affine}
    return ["inference"] + [name for name, flag in wanted.items() if flag]


#: ``python -m scripts.cli register``'s default pipeline, which the MONAI Label and Deploy apps run as well
DEFAULT_REGISTER_CONFIGS = tuple(register_config_names())


def register_config_files(config_dir: str | os.PathLike, **flags: bool) -> list[str]:
    """The paths ``config_dir/<name>.json`` of :py:func:`register_config_names` (``flags`` as there)."""
    return [str(Path(config_dir) / f"{name}.json") for name in register_config_names(**flags)]
