# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Input/output of the bundle: user errors, atomic writes, input checks (volumes, pairs, datalists, checkpoints),
datalists and pair screening, and the writer of registration outputs. Imports nothing else from ``scripts``."""

from .errors import (
    BundleUserError,
    RegistrationInputError,
    OutputExistsError,
    NonFiniteLossError,
    find_user_error,
    exit_on_user_error,
)
from .atomic import (
    temporary_path,
    atomic_path,
    save_nifti,
    save_torch,
    write_text,
    json_safe,
    write_json,
    write_csv,
    check_outputs_writable,
)
from .volume_checks import (
    MAX_SPACING_RATIO,
    MIN_SPATIAL_SIZE,
    MIN_FOV_OVERLAP,
    NIFTI_HINT,
    voxel_spacing,
    describe_grid,
    check_file_exists,
    check_spatial_dims,
    check_affine,
    check_spacing,
    check_min_size,
    check_finite,
    check_not_constant,
    check_label_values,
    load_volume,
    validate_image,
    validate_label,
    check_same_grid,
    stored_shape_problem,
)
from .pair_checks import (
    VALIDATED_KEY,
    fov_overlap_fraction,
    compare_pair_grids,
    validate_pair,
    ValidateRegistrationInputsd,
)
from .datalist_checks import (
    ENTRY_LAYOUTS,
    check_datalist,
    header_problem,
)
from .checkpoints import (
    latest_checkpoint,
    extract_state_dict,
    check_state_dict,
    read_checkpoint_state,
    check_checkpoint,
    load_network_weights,
)
from .datalist import (
    PAIR_KEYS,
    check_outputs_free,
    inference_pairs,
    load_json,
    make_pairs,
    training_pairs,
)
from .screening import (
    FAILED_PAIRS_FILE,
    PairScreen,
)
from .writer import (
    DEFAULT_OUTPUT_NAMES,
    SaveRegistrationOutputsd,
    pair_output_dir,
    write_nifti,
)
