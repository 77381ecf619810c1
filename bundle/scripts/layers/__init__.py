# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Spatial layers without weights: warping by a displacement field, velocity integration, Jacobian determinants."""

from .warp import (
    Warp,
    compose_displacements,
    identity_grid,
    warp_image,
)
from .velocity_integration import (
    VelocityIntegration,
)
from .jacobian import (
    jacobian_determinant,
    folding_percentage,
)
