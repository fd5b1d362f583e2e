"""Errors of the store: reference data that can't be saved, rows that aren't there."""

from __future__ import annotations

from prop_stream.exceptions import PropStreamError


class StoreError(PropStreamError):
    """The database can't do what was asked."""


class DatabaseLockedError(StoreError):
    """Another process holds the DuckDB file (a running service).

    Attributes:
        path: The database file.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class InvalidProgramError(StoreError):
    """A program breaks a rule of ``api.md`` and was not saved.

    Attributes:
        code: A stable reason code, e.g. ``no_evaluation_phase``.
        field: The offending field, e.g. ``phases[2].account_group``, or None.
    """

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class NotFoundError(StoreError):
    """A row the caller named does not exist."""


__all__ = ["DatabaseLockedError", "InvalidProgramError", "NotFoundError", "StoreError"]
