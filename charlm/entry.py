"""The `charlm` program's entry point (pyproject's [project.scripts]): the command line's import, guarded.

The command line (typer, rich, the command modules) takes a few hundred milliseconds to import; a
Ctrl-C in that time would print a KeyboardInterrupt traceback from the console script, so the
import itself is guarded here: exit 130 and one line, as a Ctrl-C at any later point. Once the
command is done, a Ctrl-C while the interpreter shuts down is ignored (the exit code is chosen).
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shells' convention


def _error(message: str) -> None:
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the exit code says it
        pass


def _exit_interrupted() -> None:
    """Exit 130 at once, the streams flushed. Not through sys.exit: CPython 3.11 remembers a KeyboardInterrupt
    raised inside code that C runs (an import's exec) even when Python code caught it, and at the end of
    its shutdown kills the process by SIGINT whatever exit code was chosen (seen: 1 start-up Ctrl-C in ~20)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(INTERRUPTED_EXIT)


def main() -> None:
    """Run the command line (charlm.cli.main), its import guarded against Ctrl-C."""
    try:
        from charlm.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:  # during the import, or one that got past the command line's own handling
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _error("interrupted")
        _exit_interrupted()
    except SystemExit as e:
        if e.code == INTERRUPTED_EXIT:  # the command line said "interrupted" already
            _exit_interrupted()
        raise
    finally:
        # The command is done (its exit code chosen): a Ctrl-C while the interpreter shuts down would
        # print a traceback from an exit handler (torch registers some) or kill the process by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
