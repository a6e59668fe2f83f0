"""charlm's errors: one base class, a subclass per kind of problem, each with a message a user can act on.

The library raises these and never prints or exits; the CLI prints the message as one line and
exits 1, the server answers 4xx with it. Catch `CharlmError` for all of them.
"""

from __future__ import annotations


class CharlmError(Exception):
    """A problem the user can act on. The CLI prints its message as one line and exits 1."""


class OptionError(CharlmError, ValueError):
    """An option or argument out of its range or of the wrong kind (a flag, a keyword, a config key)."""


class DataError(CharlmError):
    """Text or prepared data that cannot be used: empty, binary, not UTF-8, unknown characters, a missing corpus."""


class CheckpointError(CharlmError):
    """A checkpoint that cannot be used: missing, corrupt, hostile, or of another vocabulary or shape."""
