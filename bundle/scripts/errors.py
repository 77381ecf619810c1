"""Error types for problems the user can fix; the CLI prints their message and exits non-zero without a traceback."""

__all__ = ["BundleUserError", "RegistrationInputError", "OutputExistsError"]


class BundleUserError(Exception):
    """Base of errors the user can fix (bad inputs, existing outputs, diverged training): shown without a traceback."""


class RegistrationInputError(BundleUserError, ValueError):
    """A problem with the user's inputs (files, datalist, checkpoint, existing outputs), not a bug."""


class OutputExistsError(RegistrationInputError):
    """An output file already exists and overwriting was not requested."""
