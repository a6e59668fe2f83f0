"""The `charlm` program's entry point (pyproject's [project.scripts]): the command line's import, guarded.

The command line (typer, rich, the command modules) takes a few hundred milliseconds to import; a
Ctrl-C in that time would print a KeyboardInterrupt traceback from the console script, so the
import itself is guarded here: exit 130 and one line, as a Ctrl-C at any later point. Once the
command is done, a Ctrl-C while the interpreter shuts down is ignored (the exit code is chosen).
"""

from __future__ import annotations

import signal
import sys

INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shells' convention


def _error(message: str) -> None:
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the exit code says it
        pass


def main() -> None:
    """Run the command line (charlm.cli.main), its import guarded against Ctrl-C."""
    try:
        from charlm.cli import main as cli_main
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(INTERRUPTED_EXIT)
    try:
        cli_main()
    finally:
        # The command is done (its exit code chosen): a Ctrl-C while the interpreter shuts down would
        # print a traceback from an exit handler (torch registers some) or kill the process by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
