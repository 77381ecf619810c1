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
from scripts.layers.intensity import window_intensity
from scripts.layers.sampling import resample_moving

__all__ = ["AFFINE_MATRIX_KEY", "MIN_FOREGROUND_OVERLAP", "AffineAlignd", "foreground_overlap"]

logger = logging.getLogger(__name__)

#: data key of the (4, 4) float64 world matrix T (RAS mm, fixed point -> moving point) of the affine stage
AFFINE_MATRIX_KEY = "affine_matrix"
#: default least share of the fixed image's foreground that the centred moving foreground covers (affine_min_overlap)
MIN_FOREGROUND_OVERLAP = 0.1
#: at most this many voxels of each image enter the overlap check (every k-th voxel per axis beyond it)
OVERLAP_POINTS = 2**18


def _volume(image: Any, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(image, MetaTensor) or image.ndim != 4:
        raise ValueError(f"'{key}' must be a channel-first (C, X, Y, Z) MetaTensor with an affine, got {type(image)}.")
    return image.as_tensor()[:1].float(), torch.as_tensor(image.affine, dtype=torch.float64)


def _subsampled(image: torch.Tensor, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y, Z) image -> every k-th voxel per axis (at most ``OVERLAP_POINTS``) and that grid's (4, 4) affine."""
    step = max(1, int(np.ceil((image.numel() / OVERLAP_POINTS) ** (1 / 3))))
    return image[::step, ::step, ::step], affine @ torch.diag(affine.new_tensor([step, step, step, 1.0]))


def _foreground_weights(image: torch.Tensor) -> torch.Tensor:
    """Intensities scaled so the background (the minimum) is 0 and the 99th percentile of the rest is 1, clamped;
    all zeros for a constant image (no foreground)."""
    low = image.min()
    rest = image[image > low]
    if rest.numel() == 0:
        return torch.zeros_like(image)
    high = rest.kthvalue(max(1, round(0.99 * rest.numel()))).values
    return ((image - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)


def _centre_of_mass(weights: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World centre (3,) of a (X, Y, Z) grid with voxel-to-world ``affine`` (4, 4), weighted by ``weights``."""
    axes = [torch.arange(n, dtype=torch.float64) for n in weights.shape]
    index = torch.stack([g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij")], 1)
    w = weights.reshape(-1, 1).double()
    centre = (w * index).sum(0) / w.sum().clamp_min(1e-12)
    return affine[:3, :3] @ centre + affine[:3, 3]


def foreground_overlap(
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    threshold: float = 0.05,
    centre: bool = True,
) -> float:
    """
    Share of the fixed image's foreground that the moving image's foreground covers once their intensity centres of
    mass coincide (the affine stage's starting point), in [0, 1]; 0 when either has no foreground. Foreground: above
    ``threshold`` of the intensities scaled from the minimum (0) to the 99th percentile of the voxels above it (1).

    Args:
        moving, fixed: (X, Y, Z) intensities on their own grids. moving_affine, fixed_affine: (4, 4) voxel-to-world.
        threshold: foreground threshold in [0, 1). centre: False compares the images where they lie (no centring).

    Raises:
        ValueError: an image is not a (X, Y, Z) volume or an affine not (4, 4).
    """
    for role, image, affine in (("moving", moving, moving_affine), ("fixed", fixed, fixed_affine)):
        if image.ndim != 3 or tuple(torch.as_tensor(affine).shape) != (4, 4):
            raise ValueError(f"{role} must be a (X, Y, Z) volume with a (4, 4) affine, got shapes "
                             f"{tuple(image.shape)} and {tuple(torch.as_tensor(affine).shape)}.")
    small_m, a_m = _subsampled(moving.float(), torch.as_tensor(moving_affine, dtype=torch.float64))
    small_f, a_f = _subsampled(fixed.float(), torch.as_tensor(fixed_affine, dtype=torch.float64))
    w_m, w_f = _foreground_weights(small_m), _foreground_weights(small_f)
    shift = torch.eye(4, dtype=torch.float64)  # fixed world point -> moving world point
    if centre:
        shift[:3, 3] = _centre_of_mass(w_m, a_m) - _centre_of_mass(w_f, a_f)
    moving_fg = (w_m > threshold).float()[None, None]
    covered = resample_moving(moving_fg, a_m, small_f.shape, a_f, shift)[0, 0] > 0.5
    fixed_fg = w_f > threshold
    return float((covered & fixed_fg).sum()) / max(int(fixed_fg.sum()), 1)


class AffineAlignd(MapTransform):
    """
    Run the affine (or rigid) stage on a loaded pair and store its world matrix under ``matrix_key`` (the identity
    without a ``registration``, ``affine_transform: none``), for :py:class:`scripts.workflow.ResampleToFixedGridd`.

    Refused with one :py:class:`RegistrationInputError` instead of a silent bad result: before the optimisation, a pair
    whose foregrounds overlap less than ``min_overlap`` after centring (other anatomy, a blank or tiny volume); after
    it, a result worse than the centre-of-mass start, or degenerate (det <= 0, scaling outside [0.5, 2]).

    Args:
        keys: ``(moving image key, fixed image key)``, channel-first MetaTensors (first channel used).
        registration: an :py:class:`scripts.engines.AffineRegistration`, or None for the identity.
        device: where the optimisation runs (default: where the images are).
        matrix_key: output key of the (4, 4) float64 matrix.
        tolerance: how much worse than the start (in loss units) the result may end before it is refused.
        min_overlap: least share (:py:func:`foreground_overlap`) in [0, 1]; 0 skips the check. Real brain pairs
            (MICCAI 2012, FreeSurfer, OASIS, MNI atlases, across datasets) have 0.5-1.
        foreground_threshold: foreground threshold of :py:func:`foreground_overlap`, in [0, 1).
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        registration: AffineRegistration | None = None,
        device: torch.device | str | None = None,
        matrix_key: str = AFFINE_MATRIX_KEY,
        tolerance: float = 1e-3,
        min_overlap: float = MIN_FOREGROUND_OVERLAP,
        foreground_threshold: float = 0.05,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (moving image key, fixed image key), got {self.keys}.")
        if not 0.0 <= float(min_overlap) <= 1.0 or not 0.0 <= float(foreground_threshold) < 1.0:
            raise ValueError(f"min_overlap must be in [0, 1] and foreground_threshold in [0, 1), got {min_overlap}, "
                             f"{foreground_threshold}.")
        if registration is not None and not isinstance(registration, AffineRegistration):
            raise ValueError(f"registration must be an AffineRegistration or None, got {type(registration).__name__}.")
        self.registration = registration
        self.device = torch.device(device) if device is not None else None
        self.matrix_key = matrix_key
        self.tolerance = float(tolerance)
        self.min_overlap, self.foreground_threshold = float(min_overlap), float(foreground_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.registration is None:
            d[self.matrix_key] = torch.eye(4, dtype=torch.float64)
            return d
        (moving, moving_affine), (fixed, fixed_affine) = (_volume(d[k], k) for k in self.keys)
        self._check_overlap(moving[0], moving_affine, fixed[0], fixed_affine, d)
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

    def _source(self, d: Mapping[Hashable, Any]) -> Any:
        moving = d[self.keys[0]]
        return moving.meta.get("filename_or_obj", self.keys[0]) if isinstance(moving, MetaTensor) else self.keys[0]

    def _check_overlap(self, moving, moving_affine, fixed, fixed_affine, d: Mapping[Hashable, Any]) -> None:
        if self.min_overlap <= 0.0:
            return
        centre = self.registration.init != "identity"  # the stage's own start: centres of mass, or the identity
        window = self.registration.intensity_window
        if window is not None:  # CT: the foreground is the body the window shows, not air above scanner padding
            moving, fixed = window_intensity(moving, window), window_intensity(fixed, window)
        overlap = foreground_overlap(moving, moving_affine, fixed, fixed_affine, self.foreground_threshold, centre)
        if overlap < self.min_overlap:
            start = "after centre-of-mass alignment" if centre else "where they lie (init identity)"
            raise RegistrationInputError(
                f"affine stage for moving image '{self._source(d)}': foreground overlap check failed: its foreground "
                f"covers {100 * overlap:.1f} % of the fixed image's foreground {start}; expected at least "
                f"{100 * self.min_overlap:.0f} % (affine_min_overlap). The images do not show the same anatomy "
                "(another body part, a blank or tiny volume, a mask); check the files, or crop both to the same "
                "anatomy."
            )
        logger.info("affine stage: foreground overlap %.3f after centring (minimum %.3f)", overlap, self.min_overlap)

    def _check(self, matrix: torch.Tensor, report: Mapping[str, float], d: Mapping[Hashable, Any]) -> None:
        source = self._source(d)
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
