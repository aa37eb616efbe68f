"""User-facing errors and warnings.

Anything a user can cause (a bad path, a corrupt archive, an out-of-range value, a full disk, a
peer process that died) raises `UserError`; the CLI prints its message as one paragraph and exits
with code 2, never with a traceback. Bugs stay ordinary exceptions so they keep their traceback.
"""

from __future__ import annotations

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "\nOriginal Traceback (most recent call last):"


def _strip_worker_traceback(message: str) -> str:
    """A DataLoader worker re-raises our error in the main process as `type(text)`, where text is
    "Caught X in DataLoader worker process N.\\nOriginal Traceback ...\\nmodule.X: <message>".
    Users should see <message> only (e.g. which image is truncated), not the worker's traceback."""
    if not (message.startswith(_WORKER_PREFIX) and _WORKER_MARK in message):
        return message
    lines = message.rstrip("\n").split("\n")
    for i in range(len(lines) - 1, 0, -1):
        head, sep, rest = lines[i].partition(": ")
        if sep and head.startswith("instdisc.errors."):
            return "\n".join([rest, *lines[i + 1 :]])
    return message


class UserError(Exception):
    """A problem with the user's input or environment. The message says what and how to fix it."""

    exit_code = 2

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(_strip_worker_traceback(message) if isinstance(message, str) else message, *args)


class DataError(UserError):
    """The data source is missing, empty, unreadable or malformed."""


class ConfigError(UserError):
    """A configuration key or value is invalid."""


class CheckpointError(UserError):
    """A checkpoint is unreadable or does not match the requested model."""


class NonFiniteError(UserError):
    """The loss or a gradient became NaN or infinite (and no skip was allowed or left)."""


class PeerError(UserError):
    """Another process of a distributed run died, or stalled longer than the collective timeout."""


class InstdiscWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. a damaged checkpoint
    replaced by the previous one). The CLI prints these as one line, without a source location."""
