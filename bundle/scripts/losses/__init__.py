# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration losses: local normalised cross-correlation, displacement smoothness, the combined objective and its target."""

from .ncc import (
    LocalNCCLoss,
    box_sum,
)
from .regularization import (
    GradientLoss,
)
from .registration_loss import (
    RegistrationLoss,
    registration_target,
)
