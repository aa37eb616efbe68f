"""User-facing errors.

Anything a user can cause (a bad path, a corrupt archive, an out-of-range value) raises
`UserError`; the CLI prints its message as one paragraph and exits with code 2, never with a
traceback. Bugs stay ordinary exceptions so they keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment. The message says what and how to fix it."""

    exit_code = 2


class DataError(UserError):
    """The data source is missing, empty, unreadable or malformed."""


class ConfigError(UserError):
    """A configuration key or value is invalid."""


class CheckpointError(UserError):
    """A checkpoint is unreadable or does not match the requested model."""
