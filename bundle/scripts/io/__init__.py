# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Input/output of the bundle: user errors and warnings (``errors``), atomic writes (``atomic``), input checks and the
transforms that check and load a pair once (``input_checks``), datalists (``datalist``), the weights on disk
(``weights``), every output file name and when a pair's outputs are complete (``outputs``), the writer of registration
outputs (``writer``), label names (``label_names``), devices and torchrun ranks (``devices``) and progress bars
(``progress``). Imports nothing else from ``scripts``; its public names are listed here, once."""

from .errors import (
    BundleUserError, RegistrationInputError, OutputExistsError, NonFiniteLossError, find_user_error,
    exit_on_user_error, WARNINGS_LOGGER, route_warnings,
)
from .atomic import (
    temporary_path, temporary_files, atomic_path, save_nifti, save_torch, write_text, json_safe, write_json, write_csv,
    check_outputs_writable,
)
from .input_checks import (
    MAX_SPACING_RATIO, MIN_SPATIAL_SIZE, MIN_FOV_OVERLAP, HEADER_ATOL, NIFTI_HINT, ROLES, voxel_spacing, describe_grid,
    same_grid, is_given, check_file_exists, stored_shape_problem, header_problem, read_header, check_qform_sform,
    check_grid, check_label_grid,
    fov_overlap_fraction, compare_pair_grids, check_voxels,
    CheckRegistrationHeadersd, LoadRegistrationInputsd, CheckRegistrationContentd,
)
from .weights import (
    latest_checkpoint, check_state_dict, read_checkpoint_state, check_checkpoint,
    load_network_weights, install_weights, NETWORK_SCALE_KEY, SPACING_KEY, MAX_NETWORK_SPACING_RATIO,
    weights_info_path, write_weights_info, read_trained_network_scale, read_trained_spacing, training_spacing,
    trained_network_spacing, check_network_scale, check_network_spacing,
)
from .datalist import (
    PAIR_KEYS, MASK_KEYS, INPUT_KEYS, ENTRY_LAYOUTS, check_datalist, cli_datalist_overrides, inference_pairs, load_json,
    make_pairs, training_pairs,
)
from .devices import (
    DEVICE_PATTERN, available_devices, check_device_name, resolve_device, rank_share, rank_device, init_distributed,
    close_distributed, check_launch,
)
from .label_names import LOOKUP_TABLE_SUFFIXES, read_label_names, sidecar_lookup_table, label_names_for
from .outputs import (
    IN_PROGRESS_MARKER, VOLUME_OUTPUTS, PAIR_OUTPUTS, LABEL_OUTPUTS, RUN_OUTPUTS, VIEW_OUTPUTS, EVALUATION_OUTPUTS,
    registration_output_names, transform_file_names, pair_output_dir, check_outputs_free, check_inputs_are_not_outputs,
    expected_pair_outputs, pair_output_state, pair_outputs_complete, mark_in_progress, clear_in_progress,
    clear_interrupted_outputs,
)
from .writer import SaveRegistrationOutputsd, ConcurrentWriter, nifti_image, write_workers
from .progress import Progress, interactive_terminal
