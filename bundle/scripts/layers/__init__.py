# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Spatial layers without weights: the one sampling module (warping, sampling at voxel or world coordinates,
composition, scaling and squaring, resampling through a matrix), its network modules, Jacobian determinants, and the
intensity conventions the samplers need (an image's background, a fixed intensity window)."""

from .sampling import (
    apply_matrix,
    batch_matrices,
    compose_displacements,
    grid_sample_matrix,
    integrate_velocity,
    resample_moving,
    sample_at_voxels,
    sample_points,
    voxel_grid,
    warp_image,
)
from .warp import (
    Warp,
)
from .velocity_integration import (
    VelocityIntegration,
)
from .jacobian import (
    jacobian_determinant,
    folding_percentage,
)
from .intensity import (
    AUTO_BACKGROUND,
    background_per_key,
    check_background,
    check_intensity_window,
    resolve_background,
    window_intensity,
)
