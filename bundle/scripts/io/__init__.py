# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Input/output of the bundle: user errors, atomic writes, input checks (headers, voxels, datalists, checkpoints, the
resolution weights were trained at) and the transforms that check and load a pair once, datalists, every output file
name and when a pair's outputs are complete, the ranks of a torchrun launch, the writer of registration outputs and the
progress bars of long loops. Imports nothing else from ``scripts``."""

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
from .input_checks import (
    MAX_SPACING_RATIO,
    MIN_SPATIAL_SIZE,
    MIN_FOV_OVERLAP,
    HEADER_ATOL,
    NIFTI_HINT,
    ROLES,
    voxel_spacing,
    describe_grid,
    same_grid,
    check_file_exists,
    stored_shape_problem,
    header_problem,
    read_header,
    check_spatial_dims,
    check_affine,
    check_qform_sform,
    check_not_sheared,
    check_spacing,
    check_min_size,
    check_label_grid,
    fov_overlap_fraction,
    compare_pair_grids,
    check_finite,
    check_not_constant,
    check_label_values,
)
from .input_transforms import (
    CheckRegistrationHeadersd,
    LoadRegistrationInputsd,
    CheckRegistrationContentd,
    is_given,
)
from .checkpoints import (
    latest_checkpoint,
    extract_state_dict,
    check_state_dict,
    read_checkpoint_state,
    check_checkpoint,
    load_network_weights,
    install_weights,
)
from .weights_info import (
    NETWORK_SCALE_KEY,
    weights_info_path,
    write_weights_info,
    read_trained_network_scale,
    check_network_scale,
    SPACING_KEY,
    MAX_NETWORK_SPACING_RATIO,
    read_trained_spacing,
    training_spacing,
    trained_network_spacing,
    check_network_spacing,
)
from .datalist import (
    PAIR_KEYS,
    MASK_KEYS,
    INPUT_KEYS,
    ENTRY_LAYOUTS,
    check_datalist,
    inference_pairs,
    load_json,
    make_pairs,
    training_pairs,
)
from .console import (
    WARNINGS_LOGGER,
    route_warnings,
)
from .devices import (
    DEVICE_PATTERN,
    available_devices,
    check_device_name,
    resolve_device,
)
from .label_names import (
    LOOKUP_TABLE_SUFFIXES,
    read_label_names,
    sidecar_lookup_table,
    label_names_for,
)
from .writer import (
    DEFAULT_OUTPUT_NAMES,
    SaveRegistrationOutputsd,
    write_nifti,
)
from .outputs import (
    IN_PROGRESS_MARKER,
    LABEL_OUTPUTS,
    RUN_OUTPUTS,
    EVALUATION_OUTPUTS,
    registration_output_names,
    transform_file_names,
    pair_output_dir,
    check_outputs_free,
    check_inputs_are_not_outputs,
    expected_pair_outputs,
    pair_output_state,
    pair_outputs_complete,
    mark_in_progress,
    clear_in_progress,
    clear_interrupted_outputs,
)
from .sharding import (
    rank_share,
    rank_device,
    init_distributed,
    close_distributed,
    check_launch,
)
from .progress import Progress, interactive_terminal
