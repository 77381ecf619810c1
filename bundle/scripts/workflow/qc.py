# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Quality-control figure of one registration: the picture a registration user looks at first.

One PNG, middle slice along one array axis, 2 × 5 panels:
fixed | moving | warped | checkerboard fixed/moving (before) | checkerboard fixed/warped (after)
|fixed − moving| (before) | |fixed − warped| (after) | deformation grid (in-plane displacement, every ``grid_step``
voxels) | det J (folds ≤ 0 in black) | det J histogram.

A checkerboard alternates square tiles of the two images: edges that continue across tile borders mean the images
agree there, steps at the borders show the misalignment left. :class:`SaveQCFigured` writes the figure of every pair
of an inference run (``qc.png`` in the pair's folder), :func:`qc_png_from_outputs` the figure of finished outputs.

Intensities are scaled to [0, 1] per image with robust percentiles before differencing, because the two images of a
pair may come from different scanners/templates (e.g. MNI152 spans 0–8364, Colin27 0–133).
Uses matplotlib's object-oriented API with the Agg canvas only, so no GUI backend or global pyplot state is touched.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from scripts.io.outputs import DDF, JACOBIAN_DET, QC_PNG, WARPED_IMAGE, pair_output_dir

from .metrics import COUNT_CHUNK_VOXELS, percent_non_positive

__all__ = [
    "RANGE_SAMPLE_VOXELS",
    "robust_range",
    "robust_scale",
    "checkerboard",
    "clipped_histogram",
    "qc_figure",
    "save_qc_png",
    "qc_png_from_outputs",
    "SaveQCFigured",
]


def _as_numpy(array: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}.")
    return array


#: a volume's display range is read from at most about this many of its voxels, on a regular stride: sorting all 16
#: million voxels of a 256^3 scan for two percentiles took most of the figure's time, and on a scan the percentiles of
#: a 1-in-8 or 1-in-27 lattice differ from the whole volume's by a small fraction of the range (grey levels of a figure)
RANGE_SAMPLE_VOXELS = 1 << 20


def robust_range(volume: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> tuple[float, float]:
    """The ``lower``/``upper`` percentiles of the non-zero voxels of ``volume`` (all voxels if none), read on a regular
    lattice of at most about :data:`RANGE_SAMPLE_VOXELS` voxels (every voxel of a smaller volume)."""
    stride = max(1, int(np.ceil((volume.size / RANGE_SAMPLE_VOXELS) ** (1.0 / volume.ndim))))
    sample = volume[(slice(None, None, stride),) * volume.ndim]
    values = sample[sample != 0] if np.any(sample != 0) else sample.ravel()
    lo, hi = np.percentile(values, [lower, upper])
    return float(lo), float(hi)


def robust_scale(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Scale to [0, 1] between ``value_range`` (default: :func:`robust_range` of ``image``), clipped; a slice is scaled
    with its volume's range."""
    lo, hi = robust_range(image, lower, upper) if value_range is None else value_range
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def checkerboard(first: np.ndarray, second: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Tiles of ``first`` and ``second`` (same 2-D shape) alternating like a chess board, ``tiles`` along the longer
    side (square tiles)."""
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(f"checkerboard needs two 2-D images of one shape, got {first.shape} and {second.shape}.")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}.")
    side = max(1, int(np.ceil(max(first.shape) / tiles)))
    rows, cols = np.indices(first.shape)
    return np.where((rows // side + cols // side) % 2 == 0, first, second)


def clipped_histogram(
    values: np.ndarray, low: float, high: float, bins: int, chunk_voxels: int = COUNT_CHUNK_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(np.clip(values, low, high), bins)`` over the range of the clipped values (NaN left out, as
    matplotlib's ``hist`` takes it), counted ``chunk_voxels`` at a time: the same counts and edges without a clipped
    copy of the whole volume (420 MB for a 512 x 512 x 400 det J).

    Returns:
        ``(counts, edges)``: (bins,) int64 counts and (bins + 1,) edges.
    """
    flat = values.reshape(-1)
    # clipping keeps the order, so the clipped values' range is the clipped range of the values
    first, last = np.clip(np.nanmin(flat), low, high), np.clip(np.nanmax(flat), low, high)
    counts, edges = np.zeros(bins, dtype=np.int64), None
    for start in range(0, flat.size, chunk_voxels):
        chunk = np.clip(flat[start : start + chunk_voxels], low, high)
        part, edges = np.histogram(chunk, bins=bins, range=(first, last))
        counts += part
    return counts, edges


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    # transpose so the first remaining array axis runs horizontally and the second vertically (origin lower)
    return np.take(volume, index, axis=axis).T


#: fixed margins of the 2 x 5 panels: a layout engine (``tight_layout``, constrained layout) renders the whole figure
#: once more to measure its labels, which doubled the figure's time
_PANEL_LAYOUT = {"left": 0.035, "right": 0.99, "bottom": 0.06, "top": 0.9, "wspace": 0.28, "hspace": 0.32}


def qc_figure(
    fixed: Any,
    moving: Any,
    warped: Any,
    ddf: Any,
    det: Any | None = None,
    axis: int = 2,
    index: int | None = None,
    grid_step: int = 6,
    title: str = "",
):
    """Build the QC figure.

    Args:
        fixed: fixed image (D, H, W).
        moving: moving image (D, H, W), on the fixed grid.
        warped: warped moving image (D, H, W).
        ddf: displacement (3, D, H, W) in voxels, channel i along array axis i (warped(p) = moving(p + ddf(p))).
        det: Jacobian determinant (D, H, W); computed from ``ddf`` with ``scripts.layers.jacobian`` when None.
        axis: array axis to slice across (2 = axial for the shipped LAS/RAS data).
        index: slice index along ``axis``; the middle slice when None.
        grid_step: spacing in voxels of the deformation-grid lines.
        title: figure title (e.g. pair name and folding percentage).

    Returns:
        a ``matplotlib.figure.Figure`` (Agg canvas attached).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fixed = _as_numpy(fixed, "fixed", 3)
    moving = _as_numpy(moving, "moving", 3)
    warped = _as_numpy(warped, "warped", 3)
    ddf = _as_numpy(ddf, "ddf", 4)
    if not (fixed.shape == moving.shape == warped.shape == ddf.shape[1:]) or ddf.shape[0] != 3:
        raise ValueError(
            f"fixed {fixed.shape}, moving {moving.shape}, warped {warped.shape} must share one grid and ddf "
            f"{ddf.shape} must be (3, *that grid)."
        )
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}.")
    if grid_step < 1:
        raise ValueError(f"grid_step must be ≥ 1, got {grid_step}.")
    if det is None:
        import torch

        from scripts.layers.jacobian import jacobian_determinant

        det = jacobian_determinant(torch.from_numpy(ddf)[None])[0, 0]
    det = _as_numpy(det, "det", 3)
    if det.shape != fixed.shape:
        raise ValueError(f"det {det.shape} must be on the fixed grid {fixed.shape}.")
    index = fixed.shape[axis] // 2 if index is None else int(index)
    if not 0 <= index < fixed.shape[axis]:
        raise ValueError(f"slice index {index} outside [0, {fixed.shape[axis]}) along axis {axis}.")

    # each scan in the grey levels of its own volume, computed on the displayed slice only
    f2, m2, w2 = (robust_scale(_slice(v, axis, index), value_range=robust_range(v)) for v in (fixed, moving, warped))
    in_plane = [a for a in range(3) if a != axis]
    det2 = _slice(det, axis, index)
    u = [np.take(ddf[a], index, axis=axis) for a in in_plane]  # (n0, n1) each, NOT transposed
    folded_pct = percent_non_positive(det)

    fig = Figure(figsize=(20, 8.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 5, gridspec_kw=_PANEL_LAYOUT)
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "origin": "lower", "interpolation": "nearest"}
    axes[0, 0].imshow(f2, **grey)
    axes[0, 0].set_title("fixed")
    axes[0, 1].imshow(m2, **grey)
    axes[0, 1].set_title("moving")
    axes[0, 2].imshow(w2, **grey)
    axes[0, 2].set_title("warped moving")
    axes[0, 3].imshow(checkerboard(f2, m2), **grey)
    axes[0, 3].set_title("checkerboard fixed / moving")
    axes[0, 4].imshow(checkerboard(f2, w2), **grey)
    axes[0, 4].set_title("checkerboard fixed / warped")

    before, after = np.abs(f2 - m2), np.abs(f2 - w2)
    diff_max = max(float(np.percentile(before, 99.5)), 1e-6)
    diff = {"cmap": "magma", "vmin": 0.0, "vmax": diff_max, "origin": "lower", "interpolation": "nearest"}
    axes[1, 0].imshow(before, **diff)
    axes[1, 0].set_title(f"|fixed − moving|  mean {before.mean():.3f}")
    image = axes[1, 1].imshow(after, **diff)
    axes[1, 1].set_title(f"|fixed − warped|  mean {after.mean():.3f}")
    fig.colorbar(image, ax=axes[1, 1], fraction=0.046, pad=0.02)

    # deformation grid: the point p maps to p + u(p); draw the images of the regular grid lines
    grid_ax = axes[1, 2]
    grid_ax.imshow(f2, cmap="gray", vmin=0.0, vmax=2.5, origin="lower", interpolation="nearest")
    n0, n1 = u[0].shape
    c0, c1 = np.meshgrid(np.arange(n0), np.arange(n1), indexing="ij")
    x, y = c0 + u[0], c1 + u[1]
    for i in range(0, n0, grid_step):
        grid_ax.plot(x[i, :], y[i, :], color="tab:orange", linewidth=0.6)
    for j in range(0, n1, grid_step):
        grid_ax.plot(x[:, j], y[:, j], color="tab:orange", linewidth=0.6)
    grid_ax.set_xlim(-0.5, n0 - 0.5)
    grid_ax.set_ylim(-0.5, n1 - 0.5)
    magnitude = np.sqrt(u[0] ** 2 + u[1] ** 2)
    grid_ax.set_title(f"deformation grid, max |u| {magnitude.max():.1f} vox")

    det_ax = axes[1, 3]
    image = det_ax.imshow(det2, cmap="RdBu_r", vmin=0.0, vmax=2.0, origin="lower", interpolation="nearest")
    folds = np.ma.masked_where(det2 > 0, np.zeros_like(det2))  # value 0 = black in "gray"
    det_ax.imshow(folds, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
    det_ax.set_title(f"det J (black ≤ 0); folds {folded_pct:.3f} % of volume")
    fig.colorbar(image, ax=det_ax, fraction=0.046, pad=0.02)

    hist_ax = axes[1, 4]
    counts, edges = clipped_histogram(det, -1.0, 3.0, bins=120)
    hist_ax.hist(edges[:-1], bins=edges, weights=counts, color="tab:blue", log=True)  # one bar per bin, as counted
    hist_ax.axvline(0.0, color="black", linewidth=1.0)
    hist_ax.set_title(f"det J (all voxels): min {det.min():.2f}, max {det.max():.2f}", fontsize=10)
    hist_ax.set_xlabel("det J (clipped to [−1, 3])")

    names = "DHW"
    for ax in list(axes[0]) + list(axes[1, :4]):
        ax.set_xlabel(f"array axis {in_plane[0]} ({names[in_plane[0]]})")
        ax.set_ylabel(f"array axis {in_plane[1]} ({names[in_plane[1]]})")
        ax.set_aspect("equal")
    fig.suptitle(f"{title}  slice {index} of array axis {axis}".strip())

    return fig


def save_qc_png(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """Build the figure with ``qc_figure(*args, **kwargs)`` and write it to ``path`` (PNG) atomically."""
    from scripts.io.atomic import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"QC figure path must end with .png, got {path}.")
    fig = qc_figure(*args, **kwargs)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _resample_to_grid(image: np.ndarray, affine: np.ndarray, shape: tuple, target_affine: np.ndarray) -> np.ndarray:
    """Linear resampling of ``image`` (with ``affine``) onto the grid ``shape``/``target_affine`` (zeros outside)."""
    from scipy.ndimage import map_coordinates

    target_to_source = np.linalg.inv(affine) @ target_affine  # fixed voxel -> world -> moving voxel
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = target_to_source[:3, :3] @ grid + target_to_source[:3, 3:]
    return map_coordinates(image, coords, order=1, mode="constant", cval=0.0).reshape(shape).astype(np.float32)


def qc_png_from_outputs(
    fixed_image: str | os.PathLike,
    moving_image: str | os.PathLike,
    output_dir: str | os.PathLike,
    png_path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Write the QC PNG of a finished registration from files: the inputs plus the bundle's outputs in ``output_dir``.

    Reads ``warped_image.nii.gz`` and ``ddf.nii.gz`` (and ``jacobian_det.nii.gz`` when present) from ``output_dir``.
    A moving image on another grid is resampled onto the fixed grid through the two affines (linear), as the bundle
    does before registering (inputs are assumed affinely pre-aligned), so the "before" difference is meaningful.

    Args:
        fixed_image: fixed NIfTI file.
        moving_image: moving NIfTI file.
        output_dir: folder with the registration outputs.
        png_path: PNG to write.
        title: figure title.
    """
    import nibabel as nib

    output_dir = Path(output_dir)
    fixed_nii, moving_nii = nib.load(str(fixed_image)), nib.load(str(moving_image))
    fixed = np.asanyarray(fixed_nii.dataobj).astype(np.float32)
    moving = np.asanyarray(moving_nii.dataobj).astype(np.float32)
    if fixed.ndim != 3 or moving.ndim != 3:
        raise ValueError(f"QC figure needs 3-D images, got fixed {fixed.shape} and moving {moving.shape}.")
    if moving.shape != fixed.shape or not np.allclose(moving_nii.affine, fixed_nii.affine, atol=1e-4):
        moving = _resample_to_grid(moving, moving_nii.affine, fixed.shape, fixed_nii.affine)
    warped = np.squeeze(np.asanyarray(nib.load(str(output_dir / WARPED_IMAGE)).dataobj)).astype(np.float32)
    ddf = np.squeeze(np.asanyarray(nib.load(str(output_dir / DDF)).dataobj)).astype(np.float32)
    if ddf.ndim == 4 and ddf.shape[-1] == 3 and ddf.shape[0] != 3:
        ddf = np.moveaxis(ddf, -1, 0)  # channel-last NIfTI vector layout
    det_path = output_dir / JACOBIAN_DET
    det = np.squeeze(np.asanyarray(nib.load(str(det_path)).dataobj)).astype(np.float32) if det_path.exists() else None
    return save_qc_png(png_path, fixed, moving, warped, ddf, det, title=title)


class SaveQCFigured(MapTransform):
    """Write the QC figure of one registered pair (:func:`qc_figure`) as ``qc.png`` into the pair's output folder.

    Placed in the inference postprocessing before ``RestoreOriginalGridd``: there the fixed image, the moving image
    (after the affine stage, on the fixed grid), the warped image, the displacement and det J all lie on the fixed grid
    reoriented to RAS, scaled to [0, 1], so the figure shows an axial slice (array axis 2 is inferior -> superior) of
    every scan, whatever the orientation of its file.

    Args:
        output_dir: root output folder (a pair with an id writes into ``output_dir/<pair_id>``).
        fixed_key, moving_key, warped_key, ddf_key, det_key: data keys of the fixed image (1, D, H, W), the moving
            image on the fixed grid (1, D, H, W), the warped moving image (1, D, H, W), the displacement (3, D, H, W)
            in voxels and det J (1, D, H, W); det J is computed from the displacement when absent.
        pair_id_key: data key of the pair's sub-folder name.
        name: file name of the figure.
        enabled: False writes nothing (``--qc false``).
        overwrite: replace an existing figure (otherwise ``OutputExistsError``, as for every output).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        fixed_key: str = "fixed_image",
        moving_key: str = "moving_image",
        warped_key: str = "warped_moving_scaled",
        ddf_key: str = "pred",
        det_key: str = "jacobian_det",
        pair_id_key: str = "pair_id",
        name: str = QC_PNG,
        enabled: bool = True,
        overwrite: bool = False,
    ) -> None:
        super().__init__([fixed_key, moving_key, warped_key, ddf_key])
        self.output_dir = output_dir
        self.fixed_key, self.moving_key, self.warped_key = fixed_key, moving_key, warped_key
        self.ddf_key, self.det_key, self.pair_id_key = ddf_key, det_key, pair_id_key
        self.name = name
        self.enabled = bool(enabled)
        self.overwrite = bool(overwrite)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        from scripts.io.atomic import check_outputs_writable

        pair_id = d.get(self.pair_id_key) or None
        path = pair_output_dir(self.output_dir, pair_id) / self.name
        check_outputs_writable([path], self.overwrite)
        det = d.get(self.det_key)
        det = None if det is None else _as_numpy(det, self.det_key, 4)[0]
        volumes = [_as_numpy(d[k], k, 4)[0] for k in (self.fixed_key, self.moving_key, self.warped_key)]
        ddf = _as_numpy(d[self.ddf_key], self.ddf_key, 4)
        folded = None if det is None else percent_non_positive(det)
        title = " ".join(filter(None, [str(pair_id or ""), f"folds {folded:.3f} %" if folded is not None else ""]))
        save_qc_png(path, *volumes, ddf, det, title=title)
        return d
