# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Dictionary transforms of the registration workflows: grid matching, warping by the predicted field, Jacobian and
restoring the fixed image's own voxel grid for writing."""

from __future__ import annotations

import logging
from typing import Callable, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Orientation

from scripts.engines.resolution_inferer import ResolutionInferer, input_spacing, network_grid_size
from scripts.layers.intensity import background_per_key, resolve_background
from scripts.layers.sampling import SLAB_VOXELS, resample_moving
from scripts.io.input_checks import same_grid
from scripts.io.weights import check_network_spacing

__all__ = [
    "CheckNetworkGridd", "DownsampleToNetworkGridd", "ResampleToFixedGridd", "WarpByDdfd", "JacobianDeterminantd",
    "RestoreOriginalGridd",
]

logger = logging.getLogger(__name__)


def _affine(image: torch.Tensor) -> np.ndarray:
    """4x4 affine of a MetaTensor as float64 numpy."""
    if not isinstance(image, MetaTensor):
        raise ValueError(f"expected a MetaTensor with an affine, got {type(image).__name__}.")
    return np.asarray(image.affine, dtype=np.float64)


class ResampleToFixedGridd(MapTransform):
    """
    Resample the moving image (and its label) onto the fixed image's voxel grid through the affine stage's world matrix
    T (fixed point -> moving point, RAS mm: ``out(p) = moving(inv(A_m) T A_f p)``), or, without one, where the grids
    differ (a log line says so; the world position is kept). Where the moving field of view does not reach, an image
    gets its background (raw units: 0 HU would be soft tissue in a CT), a label map 0.

    Args:
        keys: keys to resample (e.g. ``["moving_image", "moving_label"]``), each (C, X, Y, Z).
        fixed_key: key of the fixed image whose grid is the target.
        mode: interpolation per key, e.g. ``["bilinear", "nearest"]`` (nearest for label maps).
        atol: affine tolerance in mm under which two grids are treated as equal.
        matrix_key: data key of T (:py:class:`scripts.workflow.AffineAlignd`); absent or the identity: none.
        fixed_space_keys: keys already in the fixed image's space (e.g. ``fixed_label``): never moved by the matrix.
        background: value outside the moving field of view, per key or one for all: ``"auto"`` (the volume's minimum)
            or a number (e.g. -1024 for CT). None: ``"auto"`` for ``"bilinear"`` keys, 0 for ``"nearest"`` (labels).
        allow_missing_keys: skip keys that are absent (optional labels).
    """

    def __init__(
        self,
        keys: KeysCollection,
        fixed_key: str = "fixed_image",
        mode: str | Sequence[str] = "bilinear",
        atol: float = 1e-3,
        matrix_key: str = "affine_matrix",
        fixed_space_keys: Sequence[str] = ("fixed_label",),
        background: float | str | Sequence[float | str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fixed_key = fixed_key
        self.matrix_key = matrix_key
        self.fixed_space_keys = set(fixed_space_keys)
        self.mode = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.mode) != len(self.keys):
            raise ValueError(f"mode needs one entry per key ({len(self.keys)}), got {mode!r}.")
        self.background = background_per_key(background, self.mode)
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        fixed = d[self.fixed_key]
        matrix = d.get(self.matrix_key)
        if matrix is not None and torch.allclose(torch.as_tensor(matrix, dtype=torch.float64), torch.eye(4, dtype=torch.float64)):
            matrix = None
        for key, mode, background in self.key_iterator(d, self.mode, self.background):
            if matrix is not None and key not in self.fixed_space_keys:
                d[key] = _resample_through(d[key], fixed, matrix, mode, background)
                continue
            if same_grid(d[key].shape[1:], _affine(d[key]), fixed.shape[1:], _affine(fixed), self.atol):
                continue
            logger.info("resampling %s (shape %s) onto the fixed image grid (shape %s) with %s interpolation: grids "
                        "differ", key, tuple(d[key].shape[1:]), tuple(fixed.shape[1:]), mode)
            d[key] = _resample_through(d[key], fixed, np.eye(4), mode, background)  # one world space: identity
        return d


def _resample_through(moving: torch.Tensor, fixed: torch.Tensor, matrix, mode: str, background) -> MetaTensor:
    """``moving`` (C, X, Y, Z) sampled on the grid of ``fixed`` through the world matrix (fixed -> moving point), its
    ``background`` ("auto": its minimum) outside its field of view."""
    padding = resolve_background(moving.as_tensor(), background)
    resampled = resample_moving(
        moving.as_tensor()[None], _affine(moving), fixed.shape[1:], _affine(fixed), matrix, mode=mode,
        padding_value=padding,
    )[0]
    return MetaTensor(resampled, affine=fixed.affine.clone(), meta={"filename_or_obj": moving.meta.get("filename_or_obj")})


class CheckNetworkGridd(MapTransform):
    """
    Log the grid the network will work on for an anisotropic fixed image (the inferers' choice,
    :py:meth:`scripts.engines.ResolutionInferer.scale_for`), and warn when its voxel size is far from the trained one
    (:py:func:`scripts.io.check_network_spacing`). The data pass through unchanged.

    Args:
        keys: the fixed image key (one), a MetaTensor on the grid the network input will have.
        network_scale: the inferers' ``network_scale``.
        trained_spacing: voxel size (mm per axis) of the network grid in training; None: no warning.
        isotropic: the inferers' ``isotropic`` setting.
    """

    def __init__(
        self,
        keys: KeysCollection = "fixed_image",
        network_scale: float | Sequence[float] = 0.5,
        trained_spacing: Sequence[float] | None = None,
        isotropic: bool = True,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"CheckNetworkGridd takes the fixed image key only, got {self.keys}.")
        self.grid = ResolutionInferer(network_scale=network_scale, isotropic=isotropic)
        self.trained_spacing = None if trained_spacing is None else [float(v) for v in trained_spacing]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        fixed = d[self.keys[0]]
        spacing = input_spacing(fixed)
        if spacing is None:
            raise ValueError(f"{self.keys[0]} must be a MetaTensor with an affine, got {type(fixed).__name__}.")
        scale = self.grid.scale_for(fixed)
        network = [s / k for s, k in zip(spacing, scale)]
        source = fixed.meta.get("filename_or_obj", self.keys[0])
        if list(scale) != list(self.grid.network_scale):
            mm = [" x ".join(f"{v:.3g}" for v in values) for values in (spacing, network, scale)]
            logger.info("fixed image '%s' has voxels of %s mm: the network works on a grid of %s mm voxels (network "
                        "scale %s per axis: thick-slice axes upsampled; the refinement's grid alike); every output "
                        "stays on the fixed grid", source, *mm)
        check_network_spacing(network, self.trained_spacing, spacing, source)
        return d


class DownsampleToNetworkGridd(MapTransform):
    """
    Resize training volumes to the grid the inferer (:py:class:`scripts.engines.ResolutionInferer`) gives the network at
    ``network_scale``, with the same anti-aliasing and interpolation, so a model sees in training exactly the kind of
    input it gets at inference. Label maps (``mode="nearest"``) are sampled at the network grid's voxel centres,
    ``j * (N - 1) / (n - 1)`` on the input grid (the images' align-corners mapping), so labels and images stay in
    register. Run after :py:class:`ResampleToFixedGridd` (one grid per pair); the output is a plain tensor.

    Args:
        keys: volumes, each (C, D, H, W).
        network_scale: resolution relative to the input, a number or one per axis.
        mode: ``"image"`` (anti-aliased trilinear, as the inferer) or ``"nearest"`` (label maps), one or one per key.
        allow_missing_keys: skip absent keys (e.g. labels of unlabelled pairs).
    """

    modes = ("image", "nearest")

    def __init__(
        self,
        keys: KeysCollection,
        network_scale: float | Sequence[float],
        mode: str | Sequence[str] = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resolution = ResolutionInferer(network_scale=network_scale)
        self.mode = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.mode) != len(self.keys) or any(m not in self.modes for m in self.mode):
            raise ValueError(f"mode must be one of {self.modes} or one per key ({len(self.keys)}), got {mode!r}.")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            scale = self.resolution.scale_for(d[key])  # isotropic in mm when the volume carries its spacing
            volume = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            if volume.ndim != 4:
                raise ValueError(f"'{key}' must have shape (C, D, H, W), got {tuple(volume.shape)}.")
            if mode == "nearest":
                d[key] = self._nearest(volume, scale)
            else:
                d[key] = self.resolution.downsample(volume.unsqueeze(0).float(), scale)[0]
        return d

    @staticmethod
    def _nearest(label: torch.Tensor, scale: Sequence[float]) -> torch.Tensor:
        """(C, D, H, W) -> (C, d, h, w) at ``scale`` per axis, the input voxel nearest to each network-grid centre
        (dtype kept)."""
        target = network_grid_size(label.shape[1:], scale)
        for axis, (size, n) in enumerate(zip(label.shape[1:], target)):
            j = torch.arange(n, dtype=torch.long)
            # round(j * (N - 1) / (n - 1)) in integers, ties upwards: no float ambiguity at half-voxel positions
            index = (2 * j * (size - 1) + (n - 1)) // (2 * (n - 1)) if n > 1 else torch.zeros(1, dtype=torch.long)
            label = label.index_select(axis + 1, index)
        return label


class WarpByDdfd(MapTransform):
    """
    Warp channel-first volumes of one decollated sample by its displacement field: ``out(p) = image(p + ddf(p))``;
    integer label maps keep their dtype when ``warp`` samples nearest.

    Args:
        keys: volumes to warp, each (C, D, H, W).
        warp: callable ``warp(image (B, C, D, H, W), ddf (B, 3, D, H, W))`` such as ``scripts.layers.warp.Warp``;
            its ``in_slabs`` method when it has one (the same values, one slab of the field at a time: a CT's
            full-resolution output would otherwise hold gigabytes of coordinates).
        ddf_key: key of the (3, D, H, W) displacement in voxels.
        output_keys: where to store the results, one per key (default: ``"warped_" + key``).
        reference_key: key whose affine/meta the outputs carry (the fixed image).
        allow_missing_keys: skip absent keys (optional labels).
    """

    def __init__(
        self,
        keys: KeysCollection,
        warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        ddf_key: str = "pred",
        output_keys: Sequence[str] | None = None,
        reference_key: str = "fixed_image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.warp = warp
        self.ddf_key = ddf_key
        self.output_keys = list(output_keys) if output_keys is not None else [f"warped_{k}" for k in self.keys]
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys needs one entry per key ({len(self.keys)}), got {output_keys!r}.")
        self.reference_key = reference_key
        self._warp = getattr(warp, "in_slabs", warp)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ddf = torch.as_tensor(d[self.ddf_key])
        if ddf.ndim != 4 or ddf.shape[0] != 3:
            raise ValueError(f"{self.ddf_key} must be a (3, D, H, W) displacement, got {tuple(ddf.shape)}.")
        reference = d.get(self.reference_key)
        for key, out_key in self.key_iterator(d, self.output_keys):
            image = torch.as_tensor(d[key])
            if tuple(image.shape[1:]) != tuple(ddf.shape[1:]):
                raise ValueError(f"{key} has spatial shape {tuple(image.shape[1:])}, the ddf {tuple(ddf.shape[1:])}.")
            source = image.to(ddf.device)
            warped = self._warp(source[None] if source.is_floating_point() else source[None].float(), ddf[None])[0]
            warped = warped if source.is_floating_point() else warped.to(image.dtype)
            d[out_key] = _like(warped, reference if reference is not None else d[key])
        return d


class JacobianDeterminantd(MapTransform):
    """
    Jacobian determinant of ``p -> p + ddf(p)`` for one sample's displacement (values <= 0 mark folding).

    Args:
        keys: displacement key(s), each (3, D, H, W) in voxels.
        output_key: where to store the (1, D, H, W) determinant (one key supported).
        reference_key: key whose affine/meta the output carries.
    """

    def __init__(self, keys: KeysCollection = "pred", output_key: str = "jacobian_det", reference_key: str = "fixed_image") -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"JacobianDeterminantd takes one displacement key, got {self.keys}.")
        self.output_key = output_key
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        from scripts.layers.jacobian import jacobian_determinant

        d = dict(data)
        ddf = torch.as_tensor(d[self.keys[0]]).float()
        det = jacobian_determinant(ddf[None], slab_voxels=SLAB_VOXELS)[0]  # slab-wise: a CT-sized field fits in RAM
        d[self.output_key] = _like(det, d.get(self.reference_key, d[self.keys[0]]))
        return d


class RestoreOriginalGridd(MapTransform):
    """
    Bring outputs on the reoriented fixed grid (``Orientationd`` flips and permutes axes) back onto the fixed file's own
    grid and affine. Displacement fields (``vector_keys``) get their components mapped too: with ``A`` the reoriented
    and ``A0`` the original affine, a shift ``u`` in reoriented voxels is ``inv(A0[:3, :3]) @ A[:3, :3] @ u`` in the
    file's voxels, so channel i of the written field is the shift along array axis i of the file.

    Args:
        keys: keys to restore, each a channel-first MetaTensor on the reoriented fixed grid.
        reference_key: the fixed image key; its meta holds ``original_affine`` (set by ``LoadImaged``).
        vector_keys: subset of ``keys`` holding 3-channel displacement fields in voxels.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str = "fixed_image",
        vector_keys: Sequence[str] = ("pred",),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.vector_keys = set(vector_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        reference = d[self.reference_key]
        current = _affine(reference)
        original = np.asarray(reference.meta.get("original_affine", current), dtype=np.float64)
        codes = nib.aff2axcodes(original)
        # the file's NIfTI placement codes (scanner, MNI, ...) travel with the outputs to the writer
        xform = {k: reference.meta[k] for k in ("qform_code", "sform_code") if k in reference.meta}
        for key in self.key_iterator(d):
            image = d[key]
            plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            restored = Orientation(axcodes="".join(codes))(MetaTensor(plain, affine=torch.as_tensor(current)))
            if not np.allclose(_affine(restored), original, atol=1e-3):
                raise ValueError(
                    f"cannot restore {key} onto the fixed image grid: affine after reorientation\n{_affine(restored)}\n"
                    f"differs from the original\n{original}."
                )
            array = restored.as_tensor()
            if key in self.vector_keys:
                if array.shape[0] != 3:
                    raise ValueError(f"{key} must have 3 channels to be restored as a displacement, got {array.shape[0]}.")
                rotation = np.linalg.inv(original[:3, :3]) @ current[:3, :3]
                rotation = torch.as_tensor(rotation, dtype=array.dtype, device=array.device)
                # a file stored in RAS needs no mapping: the field stays as it is, not copied (3 volumes of a CT)
                if not torch.equal(rotation, torch.eye(3, dtype=array.dtype, device=array.device)):
                    array = torch.einsum("ij,j...->i...", rotation, array)
            d[key] = MetaTensor(array, affine=torch.as_tensor(original), meta=dict(xform))
        return d


def _like(array: torch.Tensor, reference: torch.Tensor) -> MetaTensor:
    """Wrap ``array`` as a MetaTensor on the grid of ``reference`` (its affine only, no transform history)."""
    plain = array.as_tensor() if isinstance(array, MetaTensor) else array
    if isinstance(reference, MetaTensor):
        return MetaTensor(plain, affine=reference.affine.clone())
    return MetaTensor(plain)
