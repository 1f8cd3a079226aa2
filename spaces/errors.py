"""lensnas's errors: one base class, one subclass per kind of thing a user got wrong.

Every message is one line that names what is wrong (a study file and key, a command-line
option, a data file, a storage URL, an exported folder) and what is allowed. The command line
prints any :class:`LensnasError` as that line and exits with status 2, at whatever stage it is
raised, data preparation inside a trial's worker included.
"""

from __future__ import annotations


class LensnasError(Exception):
    """Bad input that lensnas can name in one line."""


class StudyFileError(LensnasError, ValueError):
    """A study file that cannot be run: ``<file>: <key path>: <what is allowed>``."""


class OptionError(LensnasError, ValueError):
    """A command-line option (or its Python keyword) with a value that is not allowed."""


class DataError(LensnasError, ValueError):
    """A data file or folder that cannot be used: ``<file>: <what is wrong>``."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class StorageError(LensnasError, RuntimeError):
    """A storage URL that cannot be opened (the message shows it with its password masked)."""


class ArchitectureError(LensnasError, ValueError):
    """An exported network that cannot be rebuilt: names the file and the key."""
