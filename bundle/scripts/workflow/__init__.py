# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Pieces of the bundle workflows: dictionary transforms on the fixed grid, ignite handlers, metrics and QC figures, and
cohorts (the record of a datalist run, the dataset streaming its pairs, the reports)."""

from .grid_transforms import (
    CheckNetworkGridd,
    DownsampleToNetworkGridd,
    ResampleToFixedGridd,
    WarpByDdfd,
    JacobianDeterminantd,
    RestoreOriginalGridd,
)
from .intensity import (
    ScaleRegistrationIntensityd,
)
from .handlers import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    AtomicCheckpointSaver,
    all_finite,
    loss_from_output,
)
from .metrics import (
    dice_per_label,
    hd95_per_label,
    label_one_hot,
    present_labels,
    registration_metrics,
)
from .metric_transforms import (
    OneHotLabelsd,
    RegistrationMetricsd,
)
from .metrics_summary import (
    MetricsSummaryHandler,
)
from .masks import (
    MaskImagesd,
)
from .alignment import (
    AFFINE_MATRIX_KEY,
    AffineAlignd,
)
from .transform_outputs import (
    TRANSFORM_METRICS_KEY,
    SaveTransformsd,
    WarpFromSourced,
)
from .reports import (
    pair_row,
    structure_volumes,
    markdown_report,
    cohort_console_summary,
    pair_console_summary,
)
from .cohort_record import (
    CohortRecord,
)
from .cohort_dataset import (
    CohortDataset,
)
from .prepare_batch import (
    RegistrationPrepareBatch,
    SharedPairPrepareBatch,
)
from .qc import (
    SaveQCFigured,
)
