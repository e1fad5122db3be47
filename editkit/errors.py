"""The exceptions editkit raises on purpose.

Every error a user can fix (a bad image, a bad option, a model that cannot be loaded) is an
:class:`EditkitError`. Its message is one short line naming the file, path or option at fault and
the fix, so the CLI and the app can show it as is (the CLI prints it and exits with code 2)
instead of a traceback. Anything else that escapes is a bug.
"""

from __future__ import annotations

__all__ = ["EditkitError", "InputError", "ModelLoadError", "NumericalError", "OutputExistsError"]


class EditkitError(Exception):
    """Base class of the errors editkit raises for problems the user can fix."""


class InputError(EditkitError, ValueError):
    """Bad user input: an unreadable or unsuitable image, an invalid option, an unwritable output."""


class OutputExistsError(InputError):
    """The output file exists and overwriting was not asked for (also when it appeared meanwhile)."""


class ModelLoadError(EditkitError):
    """A model cannot be loaded: not found, not cached while offline, unsupported family, unsafe file."""


class NumericalError(EditkitError):
    """A run produced NaN or infinite values (float16 overflow, divergence); the message names the fix."""
