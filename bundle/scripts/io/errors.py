# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""What the command line shows when something goes wrong: errors the user can fix are printed as one message (exit
status 2, no traceback), and Python warnings go to the log instead of straight to the terminal."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any, Callable

USER_ERROR_EXIT_CODE = 2
#: the logger warnings are sent to (the standard library's name for captured warnings)
WARNINGS_LOGGER = "py.warnings"


class BundleUserError(Exception):
    """Base of errors the user can fix (bad inputs, existing outputs, diverged training): shown without a traceback."""


class RegistrationInputError(BundleUserError, ValueError):
    """A problem with the user's inputs (files, datalist, checkpoint, existing outputs), not a bug."""


class OutputExistsError(RegistrationInputError):
    """An output file already exists and overwriting was not requested."""


class NonFiniteLossError(BundleUserError, RuntimeError):
    """Training or instance optimisation produced a NaN/Inf loss (diverged, or bad settings)."""


def _user_error_classes(base: type = BundleUserError) -> dict[str, type]:
    classes = {base.__name__: base}
    for subclass in base.__subclasses__():
        classes.update(_user_error_classes(subclass))
    return classes


# "scripts.io.errors.RegistrationInputError: <message>" inside a traceback pasted into a DataLoader worker's error
_PASTED_ERROR = re.compile(r"^(?:[\w.]*\.)?(\w+): (.*?)(?=\n\nThe above exception|\n\nDuring handling|\Z)", re.M | re.S)


def find_user_error(error: BaseException | None) -> BundleUserError | None:
    """Find the :class:`BundleUserError` behind an exception raised through MONAI/ignite wrappers (None if none).

    MONAI's ``Compose`` re-raises transform errors as ``RuntimeError(...) from error`` and ignite re-raises engine
    errors, so the user's error sits somewhere in the ``__cause__``/``__context__`` chain. A DataLoader worker process
    re-raises errors as a new exception whose message is the worker's whole traceback; the user error's own message is
    then taken out of that text.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if "Original Traceback" in text:
            classes = _user_error_classes()
            for name, message in _PASTED_ERROR.findall(text):
                if name in classes:
                    return classes[name](message.strip())
        if isinstance(error, BundleUserError):
            return error
        error = error.__cause__ or error.__context__
    return None


def exit_on_user_error(function: Callable[..., Any], *args: Any, debug: bool = False, **kwargs: Any) -> Any:
    """Call ``function``; if it fails because of a :class:`BundleUserError`, print ``error: <message>`` to stderr and
    exit with status 2 (no traceback). With ``debug=True``, or for any other exception (a bug), the exception
    propagates with its full traceback.
    """
    try:
        return function(*args, **kwargs)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or debug:
            raise
        logging.getLogger(__name__).debug("user error", exc_info=error)  # full traceback kept for log files
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


#: MONAI's LoadImage builds every reader it knows, also the GPU DICOM decoder where pydicom is installed, which warns on
#: each load that it cannot register: nothing the bundle reads with (NibabelReader), so a notice like the deprecations
_OPTIONAL_DECODER = "NvImgCodecPydicomReader"


def route_warnings(debug: bool = False) -> None:
    """Send every Python warning to the log (logger ``py.warnings``) instead of printing it. Library deprecation notices
    (FutureWarning, DeprecationWarning, e.g. MONAI's note on ``Orientationd``'s ``labels`` default) and the GPU DICOM
    decoder's note that it is not installed are logged at DEBUG
    level, which the bundle's ``logging.conf`` (INFO) does not show, unless ``debug`` (the CLI's ``--debug``)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        notice = issubclass(category, (FutureWarning, DeprecationWarning)) or _OPTIONAL_DECODER in str(message)
        notice = notice and not debug
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        logging.getLogger(WARNINGS_LOGGER).log(logging.DEBUG if notice else logging.WARNING, "%s", text)

    warnings.showwarning = show
