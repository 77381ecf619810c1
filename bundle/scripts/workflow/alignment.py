# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The affine stage as a dictionary transform: align a loaded pair in world space before the deformable network."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.engines.affine_registration import AffineRegistration, check_affine_result
from scripts.io.errors import RegistrationInputError

__all__ = ["AffineAlignd", "AFFINE_MATRIX_KEY"]

logger = logging.getLogger(__name__)

#: data key of the (4, 4) float64 world matrix T (RAS mm, fixed point -> moving point) of the affine stage
AFFINE_MATRIX_KEY = "affine_matrix"


def _volume(image: Any, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(image, MetaTensor) or image.ndim != 4:
        raise ValueError(f"'{key}' must be a channel-first (C, X, Y, Z) MetaTensor with an affine, got {type(image)}.")
    return image.as_tensor()[:1].float(), torch.as_tensor(image.affine, dtype=torch.float64)


class AffineAlignd(MapTransform):
    """
    Run the affine (or rigid) stage on a loaded pair and store its world matrix under ``matrix_key``.

    Place after ``LoadImaged``/``Orientationd`` and before :py:class:`scripts.workflow.ResampleToFixedGridd`, which then
    resamples the moving image and label through the matrix. Without a ``registration`` (``affine_transform: none``) the
    matrix is the identity (inputs already aligned in world space). A result that is worse than the centre-of-mass start,
    or degenerate (det <= 0, scaling outside [0.5, 2]), is refused with one message instead of being used silently.

    Args:
        keys: ``(moving image key, fixed image key)``, channel-first MetaTensors (first channel used).
        registration: an :py:class:`scripts.engines.AffineRegistration`, or None for the identity.
        device: where the optimisation runs (default: where the images are).
        matrix_key: output key of the (4, 4) float64 matrix.
        tolerance: how much worse than the start (in loss units) the result may end before it is refused.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        registration: AffineRegistration | None = None,
        device: torch.device | str | None = None,
        matrix_key: str = AFFINE_MATRIX_KEY,
        tolerance: float = 1e-3,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (moving image key, fixed image key), got {self.keys}.")
        if registration is not None and not isinstance(registration, AffineRegistration):
            raise ValueError(f"registration must be an AffineRegistration or None, got {type(registration).__name__}.")
        self.registration = registration
        self.device = torch.device(device) if device is not None else None
        self.matrix_key = matrix_key
        self.tolerance = float(tolerance)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.registration is None:
            d[self.matrix_key] = torch.eye(4, dtype=torch.float64)
            return d
        (moving, moving_affine), (fixed, fixed_affine) = (_volume(d[k], k) for k in self.keys)
        device = self.device or moving.device
        with torch.enable_grad():  # the stage optimises its parameters even inside an evaluator's no-grad context
            matrix = self.registration(moving[None].to(device), fixed[None].to(device), moving_affine, fixed_affine)[0]
        report = self.registration.last_report
        self._check(matrix, report, d)
        logger.info(
            "affine stage (%s): similarity loss %.4f at the centre-of-mass start -> %.4f (identity %.4f)",
            self.registration.transform, report["initial_loss"], report["final_loss"], report["identity_loss"],
        )
        d[self.matrix_key] = matrix.detach().cpu().to(torch.float64)
        return d

    def _check(self, matrix: torch.Tensor, report: Mapping[str, float], d: Mapping[Hashable, Any]) -> None:
        moving = d[self.keys[0]]
        source = moving.meta.get("filename_or_obj", self.keys[0]) if isinstance(moving, MetaTensor) else self.keys[0]
        try:
            check_affine_result(matrix)
        except ValueError as error:
            raise RegistrationInputError(
                f"affine stage for moving image '{source}': {error}. Expected a transform that keeps the brain's "
                "orientation and size within a factor 2; check that both images show the same anatomy, or run "
                "with --affine rigid (affine_transform: rigid)."
            ) from error
        start, end = report["initial_loss"], report["final_loss"]
        if not np.isfinite(end) or end > start + self.tolerance:
            raise RegistrationInputError(
                f"affine stage for moving image '{source}' ended worse than its initial centre-of-mass alignment "
                f"(similarity loss {end:.4f} vs {start:.4f}); expected an improvement. The images may not overlap after "
                "centring (different anatomy or field of view); crop both to the same anatomy or align them first."
            )
