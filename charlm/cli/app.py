"""The command-line application object and its error handling, shared by the command modules.

Library code raises CharlmError; `friendly` turns it into one red line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from charlm import __version__
from charlm.errors import CharlmError

app = typer.Typer(
    help="Character-level recurrent language models: prepare, train, sample, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
)
corpus_app = typer.Typer(help="Registered corpora: list them, fetch them (checksummed).", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")

err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        import torch  # only here: the version line names the torch build (CPU or CUDA) it runs on

        print(f"charlm {__version__} (torch {torch.__version__})")
        raise typer.Exit(0)


@app.callback()
def _global_options(
    version: Optional[bool] = typer.Option(None, "--version", is_eager=True, callback=_print_version,
                                           help="Print charlm's and torch's versions and exit."),
    corpora_dir: Optional[Path] = typer.Option(
        None, "--corpora-dir", metavar="DIR", show_default=False,
        help="Where corpora are fetched to and the prepare cache lives (sets $CHARLM_CORPORA_DIR for this run). "
             "Default: corpora/ in a checkout, else the per-user data dir (see: charlm corpus list)."),
):
    """Character-level recurrent language models: prepare, train, sample, evaluate."""
    if corpora_dir is not None:
        # The environment, not a global: torchrun's ranks (train --nproc) inherit it.
        os.environ["CHARLM_CORPORA_DIR"] = str(corpora_dir.expanduser().resolve())


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


def read_text_file(flag: str, path: Path, convert_hint: bool = True) -> str:
    """The whole file named by `flag` as UTF-8 text (a leading BOM dropped), or a one-line error
    naming the flag: a directory, a missing or unreadable file, bytes that are not UTF-8."""
    if path.is_dir():
        raise CharlmError(f"{flag} {path} is a directory; give a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CharlmError(f"{flag} {path} does not exist") from None
    except OSError as e:
        raise CharlmError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        hint = "; convert it, e.g. iconv -t UTF-8" if convert_hint else ""
        raise CharlmError(f"{flag} {path} is not UTF-8 text (invalid byte at offset {e.start}){hint}") from None
