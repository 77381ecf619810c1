# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Pieces of the bundle workflows: dictionary transforms on the fixed grid, ignite handlers, metrics and QC figures, and
cohorts (the record of a datalist run, the dataset streaming its pairs, the reports)."""

from .alignment import AFFINE_MATRIX_KEY, AffineAlignd
from .cohort import CohortDataset, CohortRecord
from .grid_transforms import (
    CheckNetworkGridd, DownsampleToNetworkGridd, JacobianDeterminantd, ResampleToFixedGridd, RestoreOriginalGridd,
    WarpByDdfd,
)
from .handlers import AtomicCheckpointSaver, NonFiniteLossError, NonFiniteLossGuard, all_finite, loss_from_output
from .intensity import MaskImagesd, ScaleRegistrationIntensityd
from .metrics import (
    OneHotLabelsd, RegistrationMetricsd, dice_per_label, hd95_per_label, label_one_hot, present_labels,
    registration_metrics,
)
from .prepare_batch import RegistrationPrepareBatch, SharedPairPrepareBatch
from .qc import SaveQCFigured
from .reports import (
    MetricsSummaryHandler, cohort_console_summary, markdown_report, pair_console_summary, pair_row, structure_volumes,
)
from .transform_outputs import TRANSFORM_METRICS_KEY, SaveTransformsd, WarpFromSourced
