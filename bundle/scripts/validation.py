"""Input checks for SACB-Net registration: every user mistake becomes one clear :class:`RegistrationInputError`.

Each message says what was wrong, what was expected and which file, so a batch over thousands of scans from many scanners
stops (or skips a pair) with a sentence instead of a traceback or a silently wrong result. ``docs/troubleshooting.md``
lists every message and what to do about it.

Policy choices (all overridable by arguments; documented in ``docs/troubleshooting.md``):

- ``MAX_SPACING_RATIO = 5``: largest/smallest voxel spacing above 5 (e.g. 1 x 1 x 6 mm) is refused, because the network
  works in voxel units and its 3x3x3 kernels and smoothness penalty then mean very different things along each axis.
- ``MIN_SPATIAL_SIZE = 16``: the encoder pools four times, so its coarsest level works at 1/16 resolution; an axis with
  fewer than 16 voxels has no voxel of image content there (only padding).
- ``MIN_FOV_OVERLAP = 0.1``: moving and fixed are assumed affinely pre-aligned; when their fields of view (world-space
  bounding boxes) share less than 10 % of the smaller one, they are not, and registration cannot recover that.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.errors import BundleUserError, RegistrationInputError, find_user_error

__all__ = [
    "BundleUserError",
    "RegistrationInputError",
    "MAX_SPACING_RATIO",
    "MIN_SPATIAL_SIZE",
    "MIN_FOV_OVERLAP",
    "VALIDATED_KEY",
    "check_file_exists",
    "load_volume",
    "check_spatial_dims",
    "check_affine",
    "check_spacing",
    "check_min_size",
    "check_finite",
    "check_not_constant",
    "check_label_values",
    "check_same_grid",
    "fov_overlap_fraction",
    "compare_pair_grids",
    "validate_image",
    "validate_label",
    "validate_pair",
    "check_datalist",
    "extract_state_dict",
    "check_state_dict",
    "read_checkpoint_state",
    "check_checkpoint",
    "load_network_weights",
    "ValidateRegistrationInputsd",
    "find_user_error",
]

logger = logging.getLogger(__name__)

MAX_SPACING_RATIO = 5.0
MIN_SPATIAL_SIZE = 16
MIN_FOV_OVERLAP = 0.1
#: set to True on a data dict whose files were already fully checked (``scripts.screening.PairScreen``)
VALIDATED_KEY = "inputs_validated"
NIFTI_HINT = "a readable 3-D NIfTI file (.nii or .nii.gz)"


def _describe(role: str, source: Any) -> str:
    return f"{role} '{source}'"


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the lengths of the affine's first three columns (works when oblique)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _grid_text(shape: Sequence[int], affine: np.ndarray) -> str:
    spacing = "x".join(f"{s:.3g}" for s in _spacing(affine))
    codes = "".join(nib.aff2axcodes(affine))
    return f"{'x'.join(str(int(s)) for s in shape)} voxels, {spacing} mm, {codes}"


def check_file_exists(path: str | os.PathLike, role: str = "image") -> Path:
    """Raise unless ``path`` names an existing regular file; return it as a ``Path``."""
    path = Path(path)
    if not path.exists():
        raise RegistrationInputError(f"{_describe(role, path)} does not exist; expected {NIFTI_HINT}. Check the path.")
    if not path.is_file():
        raise RegistrationInputError(f"{_describe(role, path)} is not a file; expected {NIFTI_HINT}.")
    return path


def _dims_problem(shape: tuple[int, ...]) -> str | None:
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


def check_spatial_dims(shape: Sequence[int], source: Any, role: str = "image") -> tuple[int, int, int]:
    """Return the 3-D spatial shape of a stored volume, accepting a 4-D volume with exactly one time point/channel.

    Args:
        shape: shape as stored in the file (nibabel order).
        source: file name (or description) for the message.
        role: e.g. "moving image", for the message.

    Raises:
        RegistrationInputError: 2-D data (fewer than 3 axes, or a single-voxel spatial axis), 4-D data with more than
            one volume, or anything with more axes.
    """
    shape = tuple(int(s) for s in shape)
    problem = _dims_problem(shape)
    if problem:
        raise RegistrationInputError(f"{_describe(role, source)} {problem}.")
    return shape[0], shape[1], shape[2]


def check_affine(affine: np.ndarray, source: Any, role: str = "image") -> np.ndarray:
    """Raise unless the voxel-to-world affine is finite and invertible (its voxels have a size and a place)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise RegistrationInputError(
            f"{_describe(role, source)} has an invalid voxel-to-world affine (not finite or singular); expected a "
            "header with valid voxel sizes and orientation (qform/sform). Fix the header."
        )
    return affine


def check_spacing(affine: np.ndarray, source: Any, role: str = "image", max_ratio: float = MAX_SPACING_RATIO) -> None:
    """Raise when the largest voxel spacing exceeds ``max_ratio`` times the smallest.

    The network works in voxel units: with very anisotropic voxels its 3x3x3 kernels, its ~30-voxel reach and the
    smoothness penalty mean very different physical distances along each axis.
    """
    spacing = _spacing(affine)
    ratio = float(spacing.max() / spacing.min())
    if ratio > max_ratio:
        text = " x ".join(f"{s:.3g}" for s in spacing)
        raise RegistrationInputError(
            f"{_describe(role, source)} has extremely anisotropic voxels ({text} mm, ratio {ratio:.1f}); expected a "
            f"largest/smallest spacing ratio <= {max_ratio:g}. Resample it to near-isotropic voxels first (or raise "
            "max_spacing_ratio if you accept the risk)."
        )


def check_min_size(
    spatial_shape: Sequence[int], source: Any, role: str = "image", min_size: int = MIN_SPATIAL_SIZE
) -> None:
    """Raise when an axis is shorter than ``min_size`` voxels (the network's coarsest level is 1/16 resolution)."""
    if min(int(s) for s in spatial_shape) < min_size:
        raise RegistrationInputError(
            f"{_describe(role, source)} is too small for the network ({'x'.join(str(int(s)) for s in spatial_shape)} "
            f"voxels); expected at least {min_size} voxels along every axis (the encoder pools 4 times, so its coarsest "
            "level works at 1/16 resolution). Use the full volume, not a crop or a thumbnail."
        )


def check_finite(array: np.ndarray | torch.Tensor, source: Any, role: str = "image") -> None:
    """Raise when any voxel is NaN or +-Inf (they spread through every convolution and make the output NaN)."""
    values = torch.as_tensor(array)
    if values.is_floating_point():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise RegistrationInputError(
                f"{_describe(role, source)} contains {bad} NaN/Inf voxels ({100.0 * bad / values.numel():.3g} % of "
                f"{values.numel()}); expected finite values everywhere. Replace them (e.g. by 0) before registering."
            )


def check_not_constant(array: np.ndarray | torch.Tensor, source: Any, role: str = "image") -> None:
    """Raise when every voxel has the same value: there is nothing to align (and intensity scaling would divide by 0)."""
    values = torch.as_tensor(array)
    if values.numel() and bool((values == values.reshape(-1)[0]).all()):
        raise RegistrationInputError(
            f"{_describe(role, source)} is constant (every voxel = {values.reshape(-1)[0].item():g}); expected an image "
            "with contrast. Check that the right file was given (not an empty mask or a blank export)."
        )


def check_label_values(array: np.ndarray | torch.Tensor, source: Any, role: str = "label map") -> None:
    """Raise unless every voxel of a label map is a finite integer value (a label map is warped by nearest neighbour)."""
    values = torch.as_tensor(array)
    if not values.is_floating_point():
        return
    check_finite(values, source, role)
    non_integer = int((values != torch.round(values)).sum())
    if non_integer:
        example = values[values != torch.round(values)].reshape(-1)[0].item()
        raise RegistrationInputError(
            f"{_describe(role, source)} is not integer-valued ({non_integer} voxels such as {example:g}); expected a "
            "label map with integer label ids. Did you pass an intensity image (or a resampled, interpolated label map)?"
        )


def check_same_grid(
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_source: Any,
    image_source: Any,
    label_role: str = "label map",
    atol_mm: float = 1e-3,
) -> None:
    """Raise unless a label map lies on exactly the same voxel grid (shape and affine) as its image."""
    same_shape = tuple(int(s) for s in label_shape) == tuple(int(s) for s in image_shape)
    same_affine = np.allclose(np.asarray(label_affine, float), np.asarray(image_affine, float), rtol=0.0, atol=atol_mm)
    if not (same_shape and same_affine):
        raise RegistrationInputError(
            f"{_describe(label_role, label_source)} is on a different grid ({_grid_text(label_shape, label_affine)}) "
            f"than its image '{image_source}' ({_grid_text(image_shape, image_affine)}); expected the same shape and "
            "affine. Resample the label map onto its image with nearest-neighbour interpolation."
        )


def _world_box(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of a grid's field of view, voxel edges included."""
    corners = np.array(np.meshgrid(*[[-0.5, int(s) - 0.5] for s in shape[:3]], indexing="ij")).reshape(3, -1)
    world = np.asarray(affine, float)[:3, :3] @ corners + np.asarray(affine, float)[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def fov_overlap_fraction(
    shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray
) -> float:
    """Intersection volume of two fields of view over the smaller one (0: disjoint, 1: one contains the other)."""
    low_a, high_a = _world_box(shape_a, affine_a)
    low_b, high_b = _world_box(shape_b, affine_b)
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
    atol_mm: float = 1e-3,
) -> bool:
    """Decide how moving and fixed relate: same grid (returns False), resampling needed (logs it, returns True), or
    incompatible (raises).

    Inputs are assumed affinely pre-aligned, so differing grids are fine as long as both fields of view cover the same
    part of the world; the pipeline then resamples the moving image onto the fixed grid.
    """
    same = tuple(int(s) for s in moving_shape) == tuple(int(s) for s in fixed_shape) and np.allclose(
        np.asarray(moving_affine, float), np.asarray(fixed_affine, float), rtol=0.0, atol=atol_mm
    )
    if same:
        return False
    overlap = fov_overlap_fraction(moving_shape, moving_affine, fixed_shape, fixed_affine)
    if overlap < min_overlap:
        raise RegistrationInputError(
            f"moving image '{moving_source}' ({_grid_text(moving_shape, moving_affine)}) and fixed image "
            f"'{fixed_source}' ({_grid_text(fixed_shape, fixed_affine)}) have {'no' if overlap == 0 else 'almost no'} "
            f"physical overlap ({100 * overlap:.1f} % of the smaller field of view); expected affinely pre-aligned "
            f"images whose fields of view overlap by at least {100 * min_overlap:g} %. Align them affinely first (ANTs, "
            "FSL flirt) or check the headers' origins."
        )
    logger.info(
        "moving image '%s' (%s) is on a different grid than fixed image '%s' (%s): resampling it onto the fixed grid "
        "(field-of-view overlap %.0f %%).",
        moving_source,
        _grid_text(moving_shape, moving_affine),
        fixed_source,
        _grid_text(fixed_shape, fixed_affine),
        100 * overlap,
    )
    return True


def load_volume(path: str | os.PathLike, role: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume completely and return ``(array (X, Y, Z), affine (4, 4))``.

    A 4-D file holding one volume is squeezed to 3-D. The whole voxel stream is decompressed, so a truncated file is
    caught here rather than half-way through a run.

    Raises:
        RegistrationInputError: missing file, not a NIfTI / unreadable / truncated, not 3-D, invalid affine.
    """
    path = check_file_exists(path, role)
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError, ... depending on the damage
        raise RegistrationInputError(
            f"{_describe(role, path)} could not be read ({type(error).__name__}: {error}); expected {NIFTI_HINT}."
        ) from error
    shape = check_spatial_dims(image.shape, path, role)
    affine = check_affine(image.affine, path, role)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise RegistrationInputError(
            f"{_describe(role, path)} could not be read ({type(error).__name__}: {error}); expected {NIFTI_HINT}. The "
            "file is probably truncated or corrupt (an incomplete download or copy): copy it again."
        ) from error
    return data.reshape(shape), affine


def validate_image(
    path: str | os.PathLike,
    role: str = "image",
    max_spacing_ratio: float = MAX_SPACING_RATIO,
    min_size: int = MIN_SPATIAL_SIZE,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Run every single-image check on an intensity image file; return its ``(spatial shape, affine)``."""
    data, affine = load_volume(path, role)
    check_spacing(affine, path, role, max_spacing_ratio)
    check_min_size(data.shape, path, role, min_size)
    check_finite(data, path, role)
    check_not_constant(data, path, role)
    return tuple(data.shape), affine  # type: ignore[return-value]


def validate_label(
    path: str | os.PathLike,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    image_path: Any,
    role: str = "label map",
) -> None:
    """Check a label map file: readable 3-D, integer-valued and on the same grid as its image."""
    data, affine = load_volume(path, role)
    check_same_grid(data.shape, affine, image_shape, image_affine, path, image_path, role)
    check_label_values(data, path, role)


def validate_pair(
    moving_image: str | os.PathLike,
    fixed_image: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    fixed_label: str | os.PathLike | None = None,
    max_spacing_ratio: float = MAX_SPACING_RATIO,
    min_size: int = MIN_SPATIAL_SIZE,
    min_overlap: float = MIN_FOV_OVERLAP,
) -> bool:
    """Check a registration pair (and optional label maps) before any work is done.

    Returns:
        True when the moving image has to be resampled onto the fixed grid (a log line says so), False when both
        share one grid.

    Raises:
        RegistrationInputError: the first problem found, naming the file.
    """
    moving_shape, moving_affine = validate_image(moving_image, "moving image", max_spacing_ratio, min_size)
    fixed_shape, fixed_affine = validate_image(fixed_image, "fixed image", max_spacing_ratio, min_size)
    if moving_label:
        validate_label(moving_label, moving_shape, moving_affine, moving_image, "moving label map")
    if fixed_label:
        validate_label(fixed_label, fixed_shape, fixed_affine, fixed_image, "fixed label map")
    return compare_pair_grids(
        moving_shape, moving_affine, fixed_shape, fixed_affine, moving_image, fixed_image, min_overlap
    )


def _header_problem(path: Path) -> str | None:
    """Cheap per-file check for datalists (header only, no decompression of the voxels): None when fine."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as error:
        return f"is not a readable NIfTI file ({type(error).__name__}: {error})"
    return _dims_problem(shape)


#: accepted entry layouts of a datalist in ``check_datalist(..., keys=None)``: a pair, or one image (training sets
#: that are paired later, e.g. all ordered pairs or atlas-to-subject).
ENTRY_LAYOUTS = ((("moving_image", "fixed_image"), ("moving_label", "fixed_label")), (("image",), ("label",)))


def check_datalist(
    datalist: Sequence[Mapping[str, Any]] | Mapping[str, Any] | str | os.PathLike,
    keys: KeysCollection | None = ("moving_image", "fixed_image"),
    optional_keys: KeysCollection = ("moving_label", "fixed_label"),
    base_dir: str | os.PathLike | None = None,
    source: str | None = None,
) -> Any:
    """Check every entry of a datalist before training or a batch starts, and report ALL bad entries in one error.

    Args:
        datalist: a list of dicts, a dict of such lists (e.g. ``{"training": [...], "validation": [...]}``, a dict
            entry such as ``"atlas"`` counts as one entry), or a path to a JSON file holding either.
        keys: keys every entry must have, each naming an existing, readable 3-D NIfTI file. ``None``: each entry is
            either a pair (``moving_image``, ``fixed_image``, optional labels) or an image (``image``, optional
            ``label``), as in training datalists.
        optional_keys: keys that, when present and non-empty, must name such a file too (ignored when keys is None).
        base_dir: directory that relative paths are resolved against (default: the JSON file's folder, else CWD).
        source: name used in the message (default: the JSON path or "datalist").

    Returns:
        The datalist unchanged (the loaded JSON when a path was given), so configs can wrap it in place.

    Raises:
        RegistrationInputError: listing every bad entry (section, index, key, path, problem).
    """
    if isinstance(datalist, (str, os.PathLike)):
        json_path = check_file_exists(datalist, "datalist")
        try:
            loaded = json.loads(json_path.read_text())
        except (OSError, ValueError) as error:
            raise RegistrationInputError(
                f"datalist '{json_path}' is not valid JSON ({error}); expected a list of entries or a dict of lists."
            ) from error
        return check_datalist(
            loaded, keys, optional_keys, json_path.parent if base_dir is None else base_dir, source or str(json_path)
        )
    source = source or "datalist"
    if keys is None:
        layouts = [(list(required), list(optional)) for required, optional in ENTRY_LAYOUTS]
        expected = "a pair (moving_image, fixed_image[, labels]) or an image (image[, label])"
    else:
        layouts = [([keys] if isinstance(keys, str) else list(keys),
                     [optional_keys] if isinstance(optional_keys, str) else list(optional_keys))]
        expected = f"files for {layouts[0][0]} (and {layouts[0][1]} when given)"
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    sections = datalist.items() if isinstance(datalist, Mapping) else [("", datalist)]
    problems: list[str] = []
    total = 0
    for section, entries in sections:
        single = isinstance(entries, Mapping)
        if single:  # e.g. "atlas": {"image": ..., "label": ...}; other dicts (label names, ...) are metadata
            known = {k for required, optional in layouts for k in required + optional}
            if not known.intersection(entries):
                continue
            entries = [entries]
        if not isinstance(entries, Sequence) or isinstance(entries, str):
            continue  # non-list fields (e.g. "name", "labels") are metadata, not entries
        for index, entry in enumerate(entries):
            total += 1
            where = section if single else (f"{section}[{index}]" if section else f"entry {index}")
            if not isinstance(entry, Mapping):
                problems.append(f"{where}: expected a dict with {expected}, got {type(entry).__name__}")
                continue
            # the layout whose required keys the entry has (the first one when none fits, to name what is missing)
            required, optional = next((lay for lay in layouts if any(k in entry for k in lay[0] + lay[1])), layouts[0])
            for key in required + optional:
                value = entry.get(key)
                if not value:
                    if key in required:
                        problems.append(f"{where}: missing key '{key}'")
                    continue
                path = Path(value) if Path(value).is_absolute() else base / value
                problem = _header_problem(path)
                if problem:
                    problems.append(f"{where}: {key} '{path}' {problem}")
    if problems:
        shown = "\n  ".join(problems)
        raise RegistrationInputError(
            f"{source}: {len(problems)} problem(s) in {total} entries; expected every entry to name existing, readable "
            f"3-D NIfTI {expected}. Fix or remove these entries:\n  {shown}"
        )
    return datalist


def extract_state_dict(checkpoint: Any) -> Mapping[str, torch.Tensor]:
    """The network weights inside a loaded checkpoint: a plain state dict, or one under ``model``/``network``/
    ``state_dict`` (MONAI CheckpointSaver and common trainers); a ``module.`` prefix from DataParallel is removed."""
    if isinstance(checkpoint, Mapping):
        for key in ("model", "network", "state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise RegistrationInputError(
            "checkpoint does not hold a state dict of tensors; expected a file written by torch.save(model.state_dict())"
            " or by the bundle's training (key 'model')."
        )
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module.") :]: v for k, v in checkpoint.items()}
    return checkpoint


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: Any, show: int = 5
) -> None:
    """Raise when a checkpoint's keys or shapes differ from the network's, listing the first ``show`` of each kind."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if items:
                more = f", ... ({len(items) - show} more)" if len(items) > show else ""
                parts.append(f"{len(items)} {name} keys ({', '.join(items[:show])}{more})")
        raise RegistrationInputError(
            f"checkpoint '{source}' does not match the network: {'; '.join(parts)}. Expected weights saved from the "
            "same architecture (scripts.net.SACBNet with the same base_channels, num_clusters and diffeomorphic "
            "setting as network_def). Use a checkpoint trained with this bundle's configs or fix network_def."
        )


def read_checkpoint_state(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint file and return the network state dict inside it (see :func:`extract_state_dict`).

    Raises:
        RegistrationInputError: missing, unreadable/truncated, or not holding a state dict of tensors.
    """
    path = check_file_exists(path, "checkpoint")
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as error:
        raise RegistrationInputError(
            f"checkpoint '{path}' could not be read ({type(error).__name__}: {str(error).splitlines()[0]}); expected a "
            "PyTorch file saved with torch.save. The file may be truncated (interrupted copy or save)."
        ) from error
    try:
        return extract_state_dict(checkpoint)
    except RegistrationInputError as error:
        raise RegistrationInputError(f"checkpoint '{path}': {error}") from error


def check_checkpoint(network: torch.nn.Module, path: str | os.PathLike | None) -> None:
    """Check (without loading) that a checkpoint file fits ``network``; does nothing when ``path`` is empty or absent.

    Meant for a workflow's ``initialize`` step, before MONAI's ``CheckpointLoader`` loads the file: a mismatch then
    becomes one message naming the differing keys instead of PyTorch's wall of key names.
    """
    if not path or not os.path.exists(path):
        return
    check_state_dict(network.state_dict(), read_checkpoint_state(path), path)


def load_network_weights(
    network: torch.nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a checkpoint into ``network`` after checking it exists, is readable and matches the architecture.

    Returns:
        ``network`` with the weights loaded (so a config can write ``$scripts.validation.load_network_weights(...)``).
    """
    state = read_checkpoint_state(path, map_location)
    check_state_dict(network.state_dict(), state, path)
    network.load_state_dict(state, strict=True)
    return network


class ValidateRegistrationInputsd(MapTransform):
    """Check a registration pair; placed first in ``preprocessing`` (before ``LoadImaged``).

    File paths get every check of :func:`validate_pair`. Volumes that are already loaded (channel-first arrays or
    MetaTensors, as an app may feed them) get the checks that need no file: 3-D, size, finite, not constant, integer
    labels. The data dict passes through unchanged. Empty/None label entries are skipped (labels are optional); a dict
    marked with ``VALIDATED_KEY`` (by ``scripts.screening.PairScreen``) is not checked again.

    Args:
        keys: ``(moving image key, fixed image key)``.
        label_keys: ``(moving label key, fixed label key)``; each is checked against its image when present.
        max_spacing_ratio: largest allowed ratio of voxel spacings within one image.
        min_size: smallest allowed number of voxels along every axis.
        min_overlap: smallest allowed field-of-view overlap of moving and fixed (fraction of the smaller one).
        allow_missing_keys: skip a missing image key instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        max_spacing_ratio: float = MAX_SPACING_RATIO,
        min_size: int = MIN_SPATIAL_SIZE,
        min_overlap: float = MIN_FOV_OVERLAP,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (moving image key, fixed image key), got {self.keys}.")
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        if len(self.label_keys) != 2:
            raise ValueError(f"label_keys must be (moving label key, fixed label key), got {self.label_keys}.")
        self.max_spacing_ratio = max_spacing_ratio
        self.min_size = min_size
        self.min_overlap = min_overlap

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        moving_key, fixed_key = self.keys
        if moving_key not in d or fixed_key not in d:
            if self.allow_missing_keys:
                return d
            missing = [k for k in self.keys if k not in d]
            raise RegistrationInputError(f"no input given for {missing}; expected file paths for {list(self.keys)}.")
        if d.get(VALIDATED_KEY):  # already checked by scripts.screening.PairScreen: do not read the files twice
            return d
        keys = [k for k in (moving_key, fixed_key, *self.label_keys) if d.get(k) is not None and not _is_empty(d[k])]
        if any(not isinstance(d[k], (str, os.PathLike)) for k in keys):
            self._check_loaded(d, keys)  # already loaded (e.g. a deploy/label app feeding tensors): content checks
            return d
        validate_pair(
            d[moving_key],
            d[fixed_key],
            d.get(self.label_keys[0]) or None,
            d.get(self.label_keys[1]) or None,
            self.max_spacing_ratio,
            self.min_size,
            self.min_overlap,
        )
        return d

    def _check_loaded(self, d: Mapping[str, Any], keys: Sequence[str]) -> None:
        """Checks that need no file: finite, not constant, integer labels, large enough (channel-first arrays)."""
        names = ("moving image", "fixed image", "moving label map", "fixed label map")
        roles = dict(zip((*self.keys, *self.label_keys), names))
        for key in keys:
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                value = load_volume(value, roles[key])[0]
            array = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            spatial = array.shape[1:] if array.ndim == 4 else array.shape
            source = getattr(value, "meta", {}).get("filename_or_obj", f"data['{key}']")
            check_spatial_dims(tuple(spatial), source, roles[key])
            check_min_size(spatial, source, roles[key], self.min_size)
            if key in self.label_keys:
                check_label_values(array, source, roles[key])
            else:
                check_finite(array, source, roles[key])
                check_not_constant(array, source, roles[key])


def _is_empty(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and not str(value)
