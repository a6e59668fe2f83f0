"""The charlm command line. Thin commands: parse options, call the library, print.

The command modules (data: corpus, prepare; train; decode: sample, beam, eval, info; tools: bench,
plot; viz) are the only ones that print to the terminal, own signals or exit. Library code raises
CharlmError; app.friendly turns it into one red line and exit code 1. Each command imports the
library code it needs when it runs, so `charlm sample` loads no training, corpus or prepare code.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.text import Text

from charlm import terminal, threads

# The commands, registered in the order --help lists them.
from charlm.cli import data, decode, env, export, info, serve, tools, train, viz  # noqa: E402,F401,I001
from charlm.cli.app import INTERRUPTED_EXIT, UsageError, app, closed_pipe, err

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors become one line and exit code 1, like every other error; Ctrl-C is
    one line and 130; a reader that went away is silence and 141 (charlm.terminal)."""
    terminal.escape_unencodable()  # an ASCII or POSIX locale: escapes, never a UnicodeEncodeError
    try:
        os.getcwd()
    except FileNotFoundError:  # else torch's libraries fail to load later with a fatal error (exit 2) and no hint
        _say("the current directory no longer exists (it was deleted or moved away); cd to a directory that exists")
        sys.exit(1)
    stdout_was_null = _is_devnull(sys.stdout)
    try:
        from charlm.cli.ranks import die_with_launcher

        die_with_launcher()  # a rank of `train --nproc`: it ends when its launcher does
        threads.prepare_environment()  # OpenMP reads its settings once, when torch first loads it: before any command runs
        threads.mark()  # the free cores are then read over the start-up, not over a sleep of their own
        code = app(args=argv, standalone_mode=False)
        sys.stdout.flush()  # here, not at exit: a reader gone by now is a broken pipe like any other
    except BrokenPipeError:
        code = closed_pipe().exit_code
    except SystemExit:
        if not (_typer_saw_a_broken_pipe() or (_is_devnull(sys.stdout) and not stdout_was_null)):
            raise
        code = closed_pipe().exit_code
    except UsageError as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx else ""
        _say(e.format_message() + hint)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED_EXIT
    except Exception as e:
        if type(e).__name__ != "Abort":  # typer's internal Abort (Ctrl-C at a prompt)
            raise
        code = INTERRUPTED_EXIT
    if code == INTERRUPTED_EXIT:  # typer turns a Ctrl-C into exit code 130 without a word: the word is said here
        _say("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


def _typer_saw_a_broken_pipe() -> bool:
    """Typer answers a broken pipe outside a command (--version) with exit code 1, after wrapping stdout
    and stderr in click's PacifyFlushWrapper: that wrapper is how it can be told from an error. (Its
    help, drawn by rich, exits 1 after pointing stdout at /dev/null: see _is_devnull.)"""
    return any(type(s).__name__ == "PacifyFlushWrapper" for s in (sys.stdout, sys.stderr))


def _is_devnull(stream) -> bool:
    try:
        here, null = os.fstat(stream.fileno()), os.stat(os.devnull)
    except (AttributeError, OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino, here.st_rdev) == (null.st_dev, null.st_ino, null.st_rdev)


def _say(message: str) -> None:
    try:
        err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    except BrokenPipeError:
        closed_pipe()
