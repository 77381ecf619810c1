# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""What the command line shows: Python warnings go to the log instead of straight to the terminal."""

from __future__ import annotations

import logging
import warnings

__all__ = ["WARNINGS_LOGGER", "route_warnings"]

#: the logger warnings are sent to (the standard library's name for captured warnings)
WARNINGS_LOGGER = "py.warnings"


def route_warnings(debug: bool = False) -> None:
    """
    Send every Python warning to the log (logger ``py.warnings``) instead of printing it.

    Library deprecation notices (FutureWarning, DeprecationWarning, e.g. MONAI's note on ``Orientationd``'s ``labels``
    default) are logged at DEBUG level, which the bundle's ``logging.conf`` (INFO) does not show; with ``debug`` they
    are logged at WARNING level like every other warning.

    Args:
        debug: show deprecation notices too (the CLI's ``--debug``).
    """

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        notice = issubclass(category, (FutureWarning, DeprecationWarning)) and not debug
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        logging.getLogger(WARNINGS_LOGGER).log(logging.DEBUG if notice else logging.WARNING, "%s", text)

    warnings.showwarning = show
