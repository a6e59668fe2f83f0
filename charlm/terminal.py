"""Text for a terminal or a pipe: output that survives any locale and a reader that goes away,
arguments and paths that are not valid UTF-8 handled as data.

- An ASCII or POSIX locale cannot encode most characters: the CLI writes what it cannot encode as
  backslash escapes (`ñ` -> `\\xf1`) instead of failing (`escape_unencodable`).
- A path whose name is not valid UTF-8 reaches Python as a string with surrogate escapes (PEP 383);
  it is opened by its bytes as it is, and shown with the bad bytes escaped (`shown`).
- An argument typed as UTF-8 under an ASCII locale arrives as surrogate escapes too: `argument_text`
  gives back the text the bytes spell.
- rich's consoles end the program (SystemExit(1)) when their pipe closes; `PipeConsole` raises
  BrokenPipeError instead, so that the caller decides: the CLI exits silently with 141, a training
  run saves and stops.
"""

from __future__ import annotations

import codecs
import io
import sys
from pathlib import Path
from typing import Union

from rich.console import Console

BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def shown(path: Union[str, Path]) -> str:
    """A path as text for a message: bytes that are not UTF-8 written as \\xNN escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def argument_text(value: str) -> str:
    """An argument's text: bytes that Python could not decode under this locale are decoded as UTF-8
    when they are UTF-8 (an ASCII locale with a UTF-8 terminal); other bytes stay surrogate escapes,
    for the caller to refuse by name (see `undecodable`)."""
    if not any("\udc80" <= c <= "\udcff" for c in value):
        return value
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return value


def undecodable(value: str) -> tuple[int, int] | None:
    """(position, byte) of the first byte of an argument that is not UTF-8 text, or None."""
    for i, c in enumerate(value):
        if "\udc80" <= c <= "\udcff":
            return i, ord(c) - 0xDC00
    return None


def escape_unencodable() -> None:
    """stdout and stderr write what their encoding cannot hold as backslash escapes, never failing.

    Also under a C locale, whose default (surrogateescape) fails on any character that is not a
    file name's own byte: escaping is the one rule that never fails."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors != "backslashreplace":
            stream.reconfigure(errors="backslashreplace")


def rule(stream=None) -> str:
    """The line-drawing rule of headers (── sample 2/3 ──): as itself where the stream writes UTF-8, else '--'."""
    stream = stream or sys.stderr
    try:
        return "──" if codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "utf-8" else "--"
    except LookupError:
        return "--"


def stdout_is_utf8() -> bool:
    """Whether stdout writes UTF-8; JSON for any other stdout is written ASCII-only (\\u escapes), which
    every JSON reader reads back to the same text (a backslash escape would not be JSON)."""
    try:
        return codecs.lookup(getattr(sys.stdout, "encoding", None) or "ascii").name == "utf-8"
    except LookupError:
        return False


class PipeConsole(Console):
    """A rich Console that raises BrokenPipeError when its reader goes away (rich would exit the process)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more is written through it
        raise BrokenPipeError(32, "Broken pipe")
