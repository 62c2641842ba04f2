"""Errors a user can cause, one class each, all under `UserError`.

The command line prints a `UserError` as one line (exit status 2); any other exception is a bug and keeps its
traceback. Each class also subclasses the built-in error it refines, so `except ValueError` and
`pytest.raises(ValueError)` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad option or value, a missing file, an unreachable Hub, ..."""


class ConfigError(UserError, ValueError):
    """A bad option, value or input (the message names it and what would be valid)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class CheckpointNotFoundError(MissingFileError, ValueError):
    """A checkpoint to resume from does not exist: a ValueError too, the type `Trainer.train` raises for it."""


class OutputExistsError(UserError, FileExistsError):
    """An output would overwrite something that is already there."""


class DivergedError(UserError, FloatingPointError):
    """Training diverged (a NaN/inf penalty): lower the learning rate or the coefficient."""
