"""Exceptions raised while reading and preparing data.

Every error is a ``DataError``, which subclasses ``ValueError``, so that a command-line
front end can catch one type and print its message. Messages name the file, line,
column or value involved and state what to change.
"""

from __future__ import annotations


class DataError(ValueError):
    """Invalid data file, column, label or task configuration."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that a task or option refers to does not exist."""


class UnknownLabelError(DataError):
    """A classification label that the label mapping does not contain."""


class MissingColumnError(DataError):
    """A column that an option names is not in the file.

    ``option`` is the option (for example ``"text_column"``), ``column`` the missing
    name and ``available`` the file's columns.
    """

    def __init__(self, message: str, *, option: str, column: str, available: tuple[str, ...]) -> None:
        super().__init__(message)
        self.option = option
        self.column = column
        self.available = available
