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
