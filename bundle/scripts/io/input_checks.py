# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""What makes a registration input acceptable, and the three steps that check and load a pair, each once per pair.

1. :class:`CheckRegistrationHeadersd`, before any voxel is decoded (a NIfTI header is a few hundred bytes): the file
   exists and is a readable 3-D NIfTI, its voxel-to-world matrix is finite, invertible, not sheared and agreed on by
   qform and sform, its voxels are not extremely anisotropic, it is large enough for the network, a label map or mask
   lies on its image's grid and moving and fixed overlap in world space;
2. :class:`LoadRegistrationInputsd` decodes each file once (an atlas shared by a datalist's pairs once per run);
3. :class:`CheckRegistrationContentd`, on the loaded MetaTensors: finite values, some contrast, integer label ids.

The configs' ``loading_transforms`` chain them. Every message says what was wrong, what was expected and which file
(``docs/troubleshooting.md`` lists them all). Policy choices, all overridable by arguments:

- ``MAX_SPACING_RATIO = 5``: largest/smallest voxel spacing above 5 (e.g. 1 x 1 x 6 mm) is refused, because the network
  works in voxel units and its 3x3x3 kernels and smoothness penalty then mean very different things along each axis.
- ``MIN_SPATIAL_SIZE = 16``: the encoder pools four times, so its coarsest level works at 1/16 resolution.
- ``MIN_FOV_OVERLAP = 0.1``: without the affine stage, moving and fixed must already share at least 10 % of the smaller
  field of view (world-space bounding boxes), else registration cannot recover the misplacement.
- ``HEADER_ATOL = 1e-3``: qform and sform (mm, and direction cosines, ~0.06 degrees) and label/image grids (mm) agree
  within it; float32 headers round at about 1e-5.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform

from scripts.io.errors import RegistrationInputError

logger = logging.getLogger(__name__)

MAX_SPACING_RATIO = 5.0
MIN_SPATIAL_SIZE = 16
MIN_FOV_OVERLAP = 0.1
HEADER_ATOL = 1e-3
NIFTI_HINT = "a readable 3-D NIfTI file (.nii or .nii.gz)"
#: data key of a pair -> its role in messages
ROLES = {
    "moving_image": "moving image",
    "fixed_image": "fixed image",
    "moving_label": "moving label map",
    "fixed_label": "fixed label map",
    "moving_mask": "moving mask",
    "fixed_mask": "fixed mask",
}


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the lengths of the affine's first three columns (works when oblique)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def describe_grid(shape: Sequence[int], affine: np.ndarray) -> str:
    """One-line description of a voxel grid for messages: shape, spacing, orientation codes and origin."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = "x".join(f"{s:.4g}" for s in voxel_spacing(affine))
    origin = ", ".join(f"{v:.4g}" for v in affine[:3, 3])
    codes = "".join(nib.aff2axcodes(affine))
    return f"{'x'.join(str(int(s)) for s in shape)} voxels of {spacing} mm, {codes}, origin ({origin}) mm"


def same_grid(
    shape_a: Sequence[int], affine_a: Any, shape_b: Sequence[int], affine_b: Any, atol_mm: float = HEADER_ATOL
) -> bool:
    """True when two grids have the same shape and voxel-to-world matrices equal to ``atol_mm`` (float32 headers)."""
    if tuple(int(s) for s in shape_a) != tuple(int(s) for s in shape_b):
        return False
    return bool(np.allclose(np.asarray(affine_a, float), np.asarray(affine_b, float), rtol=0.0, atol=atol_mm))


def is_given(value: Any) -> bool:
    """True for an input that was given: not None and not an empty path (optional label maps may be either)."""
    return value is not None and not (isinstance(value, (str, os.PathLike)) and not str(value))


# --- header checks


def check_file_exists(path: str | os.PathLike, role: str = "image") -> Path:
    """Raise unless ``path`` names an existing regular file; return it as a ``Path``."""
    path = Path(path)
    if not path.exists():
        raise RegistrationInputError(f"{role} '{path}' does not exist; expected {NIFTI_HINT}. Check the path.")
    if not path.is_file():
        raise RegistrationInputError(f"{role} '{path}' is not a file; expected {NIFTI_HINT}.")
    return path


def stored_shape_problem(shape: tuple[int, ...]) -> str | None:
    """What is wrong with a stored shape for a 3-D registration input (None when fine)."""
    if len(shape) < 3 or min(shape[:3]) == 1:
        return f"is 2-D (shape {shape}); expected a 3-D volume. SACB-Net registers 3-D images only"
    if len(shape) == 4 and shape[3] != 1:
        return (
            f"is 4-D with {shape[3]} volumes (shape {shape}); expected a single 3-D volume. Extract one volume first "
            "(e.g. the first time point)"
        )
    if len(shape) > 4:
        return f"has {len(shape)} axes (shape {shape}); expected a single 3-D volume"
    return None


def header_problem(path: Path) -> str | None:
    """What is wrong with a file as a 3-D NIfTI input, from its header only (None when fine): for datalist checks."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as error:
        return f"is not a readable NIfTI file ({type(error).__name__}: {error})"
    return stored_shape_problem(shape)


def read_header(path: str | os.PathLike, role: str = "image") -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file lazily (its header only: no voxel is decoded); RegistrationInputError when missing or not a
    readable NIfTI header."""
    path = check_file_exists(path, role)
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError, ... depending on the damage
        raise RegistrationInputError(
            f"{role} '{path}' could not be read ({type(error).__name__}: {error}); expected {NIFTI_HINT}."
        ) from error


def _matrix_text(matrix: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(matrix)[:3]) + "]"


def check_qform_sform(header: nib.Nifti1Header, source: Any, role: str = "image", atol: float = HEADER_ATOL) -> None:
    """Raise when qform and sform are both set (codes > 0) and place the voxels differently.

    nibabel (and so MONAI and this bundle) follows the sform, ITK may follow the qform: the transforms written for such a
    file would be right here and wrong where ANTs, SimpleITK or 3D Slicer apply them. Refusing is the only answer that
    is right everywhere; the user decides which matrix is true.
    """
    if not isinstance(header, nib.Nifti1Header):
        return
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None or sform is None or not qcode or not scode:
        return
    qspacing, sspacing = voxel_spacing(qform), voxel_spacing(sform)
    mm = max(float(np.abs(qform[:3, 3] - sform[:3, 3]).max()), float(np.abs(qspacing - sspacing).max()))
    directions = float(np.abs(qform[:3, :3] / qspacing - sform[:3, :3] / sspacing).max())
    if mm > atol or directions > atol:
        raise RegistrationInputError(
            f"{role} '{source}' has a qform {_matrix_text(qform)} (code {int(qcode)}) and an sform "
            f"{_matrix_text(sform)} (code {int(scode)}) that disagree (by up to {mm:.3g} mm, "
            f"{directions:.3g} in direction cosines); expected one voxel-to-world placement, because tools differ in "
            "which one they follow (nibabel/MONAI the sform, ITK/ANTs often the qform). Decide which is right and "
            "re-save the file with both equal, e.g. in Python: img.set_qform(img.get_sform(), code=1) then "
            "nib.save(img, path) (or FSL: fslorient -copysform2qform)."
        )


def check_grid(
    shape: Sequence[int],
    affine: np.ndarray,
    source: Any,
    role: str = "image",
    max_spacing_ratio: float | None = MAX_SPACING_RATIO,
    min_size: int | None = MIN_SPATIAL_SIZE,
    header: Any = None,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Check the voxel grid of one input (RegistrationInputError naming ``source``, a ``role``) and return its 3-D
    spatial shape and its affine as float64.

    The stored ``shape`` must be 3-D (a 4-D volume with one time point/channel is accepted); the ``affine`` finite,
    invertible and not sheared (ITK images have orthonormal direction matrices: no ITK/ANTs transform or resampling can
    describe a sheared grid, as a gantry-tilted CT has) and agreed on by the qform and sform of a file's ``header``.
    ``max_spacing_ratio`` and ``min_size`` are the policy of the module docstring (None: not checked, as for labels).
    """
    shape = tuple(int(s) for s in shape)
    problem = stored_shape_problem(shape)
    if problem:
        raise RegistrationInputError(f"{role} '{source}' {problem}.")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise RegistrationInputError(
            f"{role} '{source}' has an invalid voxel-to-world affine (not finite or singular); expected a header with "
            "valid voxel sizes and orientation (qform/sform). Fix the header."
        )
    check_qform_sform(header, source, role)
    spacing = voxel_spacing(affine)
    skew = float(np.abs((affine[:3, :3] / spacing).T @ (affine[:3, :3] / spacing) - np.eye(3)).max())
    if skew > HEADER_ATOL:
        raise RegistrationInputError(
            f"{role} '{source}' has a sheared voxel grid (axes {np.degrees(np.arcsin(min(1.0, skew))):.2g} degrees "
            f"from perpendicular; affine {_matrix_text(affine)}); expected perpendicular voxel axes, as ITK/ANTs "
            "transforms require. This is typical of a CT with gantry tilt: convert it with tilt correction (dcm2niix "
            "does by default) or resample it onto a non-sheared grid first."
        )
    ratio = float(spacing.max() / spacing.min())
    if max_spacing_ratio is not None and ratio > max_spacing_ratio:
        raise RegistrationInputError(
            f"{role} '{source}' has extremely anisotropic voxels ({' x '.join(f'{s:.3g}' for s in spacing)} mm, ratio "
            f"{ratio:.1f}); expected a largest/smallest spacing ratio <= {max_spacing_ratio:g}. Resample it to "
            "near-isotropic voxels first (or raise max_spacing_ratio if you accept the risk)."
        )
    if min_size is not None and min(shape[:3]) < min_size:
        raise RegistrationInputError(
            f"{role} '{source}' is too small for the network ({'x'.join(str(s) for s in shape[:3])} voxels); expected "
            f"at least {min_size} voxels along every axis (the encoder pools 4 times, so its coarsest level works at "
            "1/16 resolution). Use the full volume, not a crop or a thumbnail."
        )
    return (shape[0], shape[1], shape[2]), affine


def check_label_grid(
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_source: Any,
    image_source: Any,
    label_role: str = "label map",
) -> None:
    """Raise unless a label map (or mask) lies on exactly the same voxel grid (shape and affine) as its image."""
    if not same_grid(label_shape, label_affine, image_shape, image_affine):
        raise RegistrationInputError(
            f"{label_role} '{label_source}' is on a different grid ({describe_grid(label_shape, label_affine)}) than "
            f"its image '{image_source}' ({describe_grid(image_shape, image_affine)}); expected the same shape and "
            "affine. Resample the label map onto its image with nearest-neighbour interpolation."
        )


def fov_overlap_fraction(
    shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray
) -> float:
    """Intersection volume of two fields of view (world bounding boxes, voxel edges included) over the smaller one
    (0: disjoint, 1: one contains the other)."""
    boxes = []
    for shape, affine in ((shape_a, affine_a), (shape_b, affine_b)):
        corners = np.array(np.meshgrid(*[[-0.5, int(s) - 0.5] for s in shape[:3]], indexing="ij")).reshape(3, -1)
        world = np.asarray(affine, float)[:3, :3] @ corners + np.asarray(affine, float)[:3, 3:4]
        boxes.append((world.min(axis=1), world.max(axis=1)))
    (low_a, high_a), (low_b, high_b) = boxes
    inter = np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0.0, None).prod()
    smaller = min((high_a - low_a).prod(), (high_b - low_b).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def compare_pair_grids(
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    moving_source: Any,
    fixed_source: Any,
    min_overlap: float = MIN_FOV_OVERLAP,
) -> bool:
    """Decide how moving and fixed relate: same grid (False), resampling onto the fixed grid needed (True), or too far
    apart in world space (raises: less than ``min_overlap`` of the smaller field of view shared)."""
    if same_grid(moving_shape, moving_affine, fixed_shape, fixed_affine):
        return False
    overlap = fov_overlap_fraction(moving_shape, moving_affine, fixed_shape, fixed_affine)
    if overlap < min_overlap:
        raise RegistrationInputError(
            f"moving image '{moving_source}' ({describe_grid(moving_shape, moving_affine)}) and fixed image "
            f"'{fixed_source}' ({describe_grid(fixed_shape, fixed_affine)}) have {'no' if overlap == 0 else 'almost no'} "
            f"physical overlap ({100 * overlap:.1f} % of the smaller field of view); expected affinely pre-aligned "
            f"images whose fields of view overlap by at least {100 * min_overlap:g} %. Keep the affine stage on "
            "(--affine affine), align them first (ANTs, FSL flirt) or check the headers' origins."
        )
    return True


# --- content checks, on the decoded voxels


def check_voxels(array: np.ndarray | torch.Tensor, source: Any, role: str = "image", kind: str = "image") -> None:
    """
    The checks that need the voxels of an input (RegistrationInputError naming ``source``, a ``role``).

    Every ``kind`` must be finite (NaN/Inf spread through every convolution and make the output NaN); an ``"image"``
    must not be constant (nothing to align, and intensity scaling would divide by 0); a ``"label"`` map must hold
    integer label ids (it is warped by nearest neighbour); a ``"mask"`` must mark at least one voxel (values > 0).
    """
    values = torch.as_tensor(array)
    bad = int((~torch.isfinite(values)).sum()) if values.is_floating_point() else 0
    if bad:
        raise RegistrationInputError(
            f"{role} '{source}' contains {bad} NaN/Inf voxels ({100.0 * bad / values.numel():.3g} % of "
            f"{values.numel()}); expected finite values everywhere. Replace them (e.g. by 0) before registering."
        )
    if kind == "image" and values.numel() and bool((values == values.reshape(-1)[0]).all()):
        raise RegistrationInputError(
            f"{role} '{source}' is constant (every voxel = {values.reshape(-1)[0].item():g}); expected an image with "
            "contrast. Check that the right file was given (not an empty mask or a blank export)."
        )
    fractional = values != torch.round(values) if kind == "label" and values.is_floating_point() else None
    if fractional is not None and fractional.any():
        raise RegistrationInputError(
            f"{role} '{source}' is not integer-valued ({int(fractional.sum())} voxels such as "
            f"{values[fractional].reshape(-1)[0].item():g}); expected a label map with integer label ids. Did you "
            "pass an intensity image (or a resampled, interpolated label map)?"
        )
    if kind == "mask" and not bool((values > 0).any()):
        raise RegistrationInputError(
            f"{role} '{source}' is empty (no voxel > 0); expected a mask of the region to register (e.g. the brain), "
            "values > 0 inside. Check that the right file was given."
        )


# --- the three steps of a pair


def _role(key: Hashable) -> str:
    return ROLES.get(str(key), f"input '{key}'")


def _source(value: Any, key: Hashable | None = None) -> str:
    """How messages name an input: its path, or the file a loaded volume came from."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj") or (f"data['{key}']" if key is not None else "a loaded volume"))


def _key_pair(keys: KeysCollection, name: str, kind: str) -> tuple[Hashable, Hashable]:
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if len(keys) != 2:
        raise ValueError(f"{name} must be (moving {kind} key, fixed {kind} key), got {keys}.")
    return keys[0], keys[1]


class CheckRegistrationHeadersd(MapTransform):
    """Check a pair from its headers only (no voxel decoded); the data dict passes through unchanged.

    Volumes already loaded (channel-first arrays or MetaTensors, as an app may feed them) are checked from their shape
    and ``affine`` metadata instead of a header.

    Args:
        keys: ``(moving image key, fixed image key)``.
        label_keys: ``(moving label key, fixed label key)``; each is checked against its image when given.
        max_spacing_ratio: largest allowed ratio of voxel spacings within one image.
        min_size: smallest allowed number of voxels along every axis.
        min_overlap: smallest allowed field-of-view overlap of moving and fixed (fraction of the smaller one).
        allow_missing_keys: pass a dict without the image keys through unchecked instead of raising.
        mask_keys: ``(moving mask key, fixed mask key)``; each is checked against its image when given.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        max_spacing_ratio: float = MAX_SPACING_RATIO,
        min_size: int = MIN_SPATIAL_SIZE,
        min_overlap: float = MIN_FOV_OVERLAP,
        allow_missing_keys: bool = False,
        mask_keys: KeysCollection = ("moving_mask", "fixed_mask"),
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = _key_pair(mask_keys, "mask_keys", "mask")
        _key_pair(self.keys, "keys", "image")
        self.label_keys = _key_pair(label_keys, "label_keys", "label")
        if max_spacing_ratio < 1 or min_size < 1 or not 0 <= min_overlap <= 1:
            raise ValueError(
                f"expected max_spacing_ratio >= 1, min_size >= 1 and 0 <= min_overlap <= 1, got {max_spacing_ratio}, "
                f"{min_size}, {min_overlap}."
            )
        self.max_spacing_ratio, self.min_size, self.min_overlap = max_spacing_ratio, min_size, min_overlap

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        moving_key, fixed_key = self.keys
        missing = [k for k in self.keys if not is_given(d.get(k))]
        if missing:
            if self.allow_missing_keys and all(k not in d for k in self.keys):
                return d
            raise RegistrationInputError(
                f"the pair has no {' and no '.join(_role(k) for k in missing)}; expected both images."
            )
        moving_label_key, fixed_label_key = self.label_keys
        if is_given(d.get(fixed_label_key)) and not is_given(d.get(moving_label_key)):
            raise RegistrationInputError(
                f"fixed label map '{d[fixed_label_key]}' was given without a moving label map; expected both "
                "(Dice compares the warped moving labels with the fixed ones) or only the moving one."
            )
        grids = {}
        sides = ((moving_key, moving_label_key, self.mask_keys[0]), (fixed_key, fixed_label_key, self.mask_keys[1]))
        for image_key, *companion_keys in sides:
            grids[image_key] = self._grid(d[image_key], _role(image_key), label=False)
            for key in companion_keys:  # a label map or a mask belongs to its image's voxels
                if is_given(d.get(key)):
                    grid = self._grid(d[key], _role(key), label=True)
                    check_label_grid(*grid, *grids[image_key], _source(d[key]), _source(d[image_key]), _role(key))
        moving, fixed = grids[moving_key], grids[fixed_key]
        if compare_pair_grids(*moving, *fixed, _source(d[moving_key]), _source(d[fixed_key]), self.min_overlap):
            logger.info(
                "moving image '%s' (%s) is on a different grid than fixed image '%s' (%s): resampling it onto the fixed "
                "grid (field-of-view overlap %.0f %%).", _source(d[moving_key]), describe_grid(*moving),
                _source(d[fixed_key]), describe_grid(*fixed), 100 * fov_overlap_fraction(*moving, *fixed),
            )
        return d

    def _grid(self, value: Any, role: str, label: bool) -> tuple[tuple[int, int, int], np.ndarray]:
        """(spatial shape, affine) of one input from its header (file) or its array and metadata (loaded volume)."""
        source, header = _source(value), None
        if isinstance(value, (str, os.PathLike)):
            image = read_header(value, role)
            shape, affine, header = image.shape, image.affine, image.header
        else:
            array = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            shape = tuple(array.shape[1:]) if array.ndim == 4 else tuple(array.shape)
            affine = getattr(value, "affine", None)  # a MetaTensor's meta["affine"]; identity when it carries none
            affine = np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
        limits = (None, None) if label else (self.max_spacing_ratio, self.min_size)
        return check_grid(shape, affine, source, role, *limits, header=header)


class LoadRegistrationInputsd(MapTransform):
    """Decode each given input file into a MetaTensor (MONAI's ``LoadImage``), once per pair.

    Optional keys that are absent or empty are skipped, volumes already loaded pass through, and a file that cannot be
    decoded (truncated or corrupt) raises a ``RegistrationInputError`` naming it.

    Args:
        keys: data keys holding file paths (moving/fixed image and label keys).
        reader: MONAI image reader (name or instance); the bundle reads NIfTI with ``"NibabelReader"``.
        allow_missing_keys: skip absent keys (labels are optional).
        label_keys: keys of label maps, decoded in their file's own type (uint8 / int16 label ids stay integers: a
            quarter or half of the float32 copy every later step would otherwise hold). Other keys become float32.
        keep_decoded: keep the last volume of each key with its file's identity (path, size, modification time), so
            that when the next pair names the same file under that key (a datalist's atlas) a copy is returned instead
            of decoding it again. False for a run of one pair: there is no next pair, and the kept copies of a CT-sized
            pair would stay in memory through the whole registration (1.7 GB at 512 x 512 x 400).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: Any = "NibabelReader",
        allow_missing_keys: bool = True,
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        keep_decoded: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(reader=reader, image_only=True)
        self.label_loader = LoadImage(reader=reader, image_only=True, dtype=None)
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.keep_decoded = bool(keep_decoded)
        self._last: dict[Hashable, tuple[tuple[str, int, int], Any]] = {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not is_given(path) or not isinstance(path, (str, os.PathLike)):
                continue  # optional input not given, or a volume already loaded
            stat = os.stat(path)  # a file rewritten between two pairs is decoded again
            identity = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
            last = self._last.get(key)
            if last is not None and last[0] == identity:
                d[key] = copy.deepcopy(last[1])
                continue
            d[key] = self._decode(path, _role(key), self.label_loader if key in self.label_keys else self.loader)
            if self.keep_decoded:
                self._last[key] = (identity, d[key])
                d[key] = copy.deepcopy(d[key])  # later transforms may change it in place; the kept copy stays as read
        return d

    @staticmethod
    def _decode(path: str | os.PathLike, role: str, loader: LoadImage) -> Any:
        try:
            return loader(str(path))
        except Exception as error:  # nibabel/zlib/gzip raise EOFError, OSError, zlib.error ... on damaged files
            cause = error
            while cause.__cause__ is not None:  # MONAI wraps the reader's error (with tracebacks in its text)
                cause = cause.__cause__
            raise RegistrationInputError(
                f"{role} '{path}' could not be read ({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}); "
                f"expected {NIFTI_HINT}. The file is probably truncated or corrupt (an incomplete download or copy): "
                "copy it again."
            ) from error


class CheckRegistrationContentd(MapTransform):
    """:func:`check_voxels` of the loaded (channel-first) images under ``keys``, label maps under ``label_keys`` and
    masks under ``mask_keys``; absent or empty keys are skipped. The data dict passes through unchanged."""

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        allow_missing_keys: bool = True,
        mask_keys: KeysCollection = ("moving_mask", "fixed_mask"),
    ) -> None:
        keys, label_keys, mask_keys = ((k,) if isinstance(k, str) else tuple(k) for k in (keys, label_keys, mask_keys))
        super().__init__(keys + label_keys + mask_keys, allow_missing_keys)
        self.label_keys, self.mask_keys = set(label_keys), set(mask_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not is_given(value):
                continue
            if isinstance(value, (str, os.PathLike)):
                raise ValueError(f"CheckRegistrationContentd needs loaded volumes; data['{key}'] is the path {value}.")
            kind = "label" if key in self.label_keys else "mask" if key in self.mask_keys else "image"
            check_voxels(value, _source(value, key), _role(key), kind)
        return d
