# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration engines that run a network on a pair: resolution-aware inference and instance optimisation."""

from .resolution_inferer import (
    ResolutionInferer,
    network_fields,
    network_grid_size,
    resize_displacement,
)
from .instance_optimization import (
    InstanceOptimizationInferer,
)
from .zero_field_inferer import (
    ZeroFieldInferer,
)
from .affine_registration import (
    AffineRegistration,
    check_affine_result,
    normalize_intensity,
)
from .field_refinement import (
    FieldRefinementInferer,
    loss_has_converged,
    refine_displacement,
    scale_within_voxel_budget,
)
from .foreground_crop_inferer import (
    ForegroundCropInferer,
    crop_to_box,
    extend_from_box,
    foreground_box,
)
