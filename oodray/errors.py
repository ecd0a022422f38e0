"""The error types every oodray CLI maps to an exit code (`oodray.cli.run`), and nothing else does.

- `OodrayError` and its subclasses: bad input from the user (names, paths, values, files); one line, exit 2.
- `RunFailed`: the input was fine but the run failed (a trial or an evaluation task); one line with the reason,
  exit 1, finished work kept.
Any other exception is a bug in oodray and keeps its traceback.
"""

from __future__ import annotations


class OodrayError(Exception):
    """Base class of errors caused by the user's input (names, paths, values); CLIs exit 2 on these."""


class ConfigError(OodrayError, ValueError):
    """A config key, value or type that is not accepted."""


class DataError(OodrayError):
    """A dataset that is missing, unreadable or has the wrong layout or shape."""


class CheckpointError(OodrayError):
    """A checkpoint that is missing, corrupt, or made for another dataset/architecture."""


class StorageFullError(OodrayError):
    """The device or quota holding a file oodray writes is full; what was finished before is kept."""


class StateFileError(CheckpointError, ValueError):
    """A resumable state file (AutoAttack's) that is unreadable or belongs to another evaluation."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; the message says where it stopped and how to resume. CLIs exit 130."""


class RunFailed(Exception):
    """A run that started on valid input and failed (workers, trials, evaluation tasks); CLIs exit 1."""
