"""The command-line application object and its error handling, shared by the command modules.

Library code raises CharlmError; `friendly` turns it into one red line on stderr and exit code 1.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.text import Text

from charlm import CharlmError

app = typer.Typer(
    help="Character-level recurrent language models: prepare, train, sample, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
corpus_app = typer.Typer(help="Registered corpora: list them, fetch them (checksummed).", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")

err = Console(stderr=True)

# Typer's usage-error class, found through a public name: typer has both depended on click and vendored it.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def fail(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    raise typer.Exit(1)


def friendly(fn):
    """Turn CharlmError (and a second Ctrl-C) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CharlmError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")
        except OSError as e:
            fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))

    return wrapper
