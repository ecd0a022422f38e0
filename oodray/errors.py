"""User-facing errors: bad input that a CLI reports in one line with exit code 2 (never a traceback)."""

from __future__ import annotations


class OodrayError(Exception):
    """Base class of errors caused by the user's input (names, paths, values); CLIs exit 2 on these."""


class ConfigError(OodrayError, ValueError):
    """A config key, value or type that is not accepted."""


class DataError(OodrayError):
    """A dataset that is missing, unreadable or has the wrong layout or shape."""


class CheckpointError(OodrayError):
    """A checkpoint that is missing, corrupt, or made for another dataset/architecture."""
