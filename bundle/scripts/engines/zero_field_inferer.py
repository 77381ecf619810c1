# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""An inferer that returns no deformation: the pipeline stops after the affine stage (``--affine_only``)."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["ZeroFieldInferer"]


class ZeroFieldInferer(Inferer):
    """
    Return a zero displacement field for a pair, without running the network.

    With the affine stage in ``preprocessing``, the outputs are then exactly the affine result (``affine.mat``, a zero
    ``warp.nii.gz``, the affinely resampled moving image and labels), written by the same postprocessing as a full run.

    Call:
        inputs: (B, 2, D, H, W) moving + fixed image; network: ignored.
        Returns (B, 3, D, H, W) zeros in the dtype and device of ``inputs``.
    """

    def __call__(self, inputs: torch.Tensor, network: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[1] != 2:
            raise ValueError(f"inputs must be (B, 2, D, H, W) moving + fixed, got {tuple(inputs.shape)}.")
        return torch.zeros((inputs.shape[0], 3, *inputs.shape[2:]), dtype=inputs.dtype, device=inputs.device)
