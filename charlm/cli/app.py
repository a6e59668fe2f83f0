"""The command-line application object and its error handling, shared by the command modules.

Library code raises CharlmError; `friendly` turns it into one red line on stderr and exit code 1.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from charlm import __version__
from charlm.errors import CharlmError
from charlm.terminal import BROKEN_PIPE_EXIT, PipeConsole, shown

app = typer.Typer(
    help="Character-level recurrent language models: prepare, train, sample, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
)
corpus_app = typer.Typer(help="Registered corpora: list them, fetch them (checksummed).", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")

err = PipeConsole(stderr=True)  # a closed stderr raises BrokenPipeError (rich would exit 1): see closed_pipe
INTERRUPTED_EXIT = 130  # Ctrl-C outside training's save-and-stop: 128 + SIGINT, the shells' convention

THREADS_ENV = "CHARLM_THREADS"


def _print_version(value: bool) -> None:
    if value:
        print(f"charlm {__version__} (torch {_torch_version()})")
        raise typer.Exit(0)


def _torch_version() -> str:
    """The installed torch's version from its package metadata (the build too: 2.5.1+cpu): importing torch takes seconds."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"


@app.callback()
def _global_options(
    version: Optional[bool] = typer.Option(
        None, "--version", is_eager=True, callback=_print_version, help="Print charlm's and torch's versions and exit."
    ),
    corpora_dir: Optional[Path] = typer.Option(
        None,
        "--corpora-dir",
        metavar="DIR",
        show_default=False,
        help="Where corpora are fetched to and the prepare cache lives (sets $CHARLM_CORPORA_DIR for this run). "
        "Default: corpora/ in a checkout, else the per-user data dir (see: charlm corpus list).",
    ),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        metavar="N",
        min=1,
        show_default=False,
        help="Threads for the model's work (default: chosen from the idle cores and the kind of work).",
    ),
) -> None:
    """Character-level recurrent language models: prepare, train, sample, evaluate."""
    # The environment, not globals: torchrun's ranks (train --nproc) inherit them.
    if corpora_dir is not None:
        os.environ["CHARLM_CORPORA_DIR"] = str(corpora_dir.expanduser().resolve())
    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)  # read by charlm/threads.py


# Typer's usage-error class, found through a public name: typer has both depended on click and vendored it.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def fail(message: str, code: int = 1) -> None:
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    raise typer.Exit(code)


def friendly(fn):
    """Turn CharlmError and OSError into one line on stderr and exit code 1; a reader that went away
    (a broken pipe, on stdout or stderr) into silence and exit code 141; Ctrl-C is left to main()."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return _reporting(fn, *args, **kwargs)
        except BrokenPipeError:
            raise closed_pipe() from None

    return wrapper


def _reporting(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CharlmError as e:
        fail(str(e))
    except BrokenPipeError:
        raise
    except OSError as e:
        fail(os_error_message(e))


def os_error_message(e: OSError) -> str:
    """An OSError as one line: what happened, to which file, and for a full disk what to do."""
    where = shown(e.filename) if getattr(e, "filename", None) else None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        place = f"the device holding {where}" if where else "the device"
        return f"no space left on {place} ({e.strerror}); free some space and run the command again"
    return f"{e.strerror or e}: {where}" if where else str(e)


def closed_pipe() -> typer.Exit:
    """The reader went away: write nothing more (stdout now goes to /dev/null, so that the flush at
    exit cannot fail either) and exit 141, as a shell reports a writer killed by SIGPIPE."""
    _to_devnull(sys.stdout)
    try:
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr's reader went too (`2>&1 | head`)
        _to_devnull(sys.stderr)
        err.quiet = True
    return typer.Exit(BROKEN_PIPE_EXIT)


def _to_devnull(stream) -> None:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to guard
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def read_text_file(flag: str, path: Path, convert_hint: bool = True) -> str:
    """The whole file named by `flag` as UTF-8 text (a leading BOM dropped), or a one-line error
    naming the flag: a directory, a missing or unreadable file, bytes that are not UTF-8."""
    if path.is_dir():
        raise CharlmError(f"{flag} {shown(path)} is a directory; give a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CharlmError(f"{flag} {shown(path)} does not exist") from None
    except OSError as e:
        raise CharlmError(f"cannot read {flag} {shown(path)}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")  # the BOM rule, everywhere a text is read: a leading BOM is not text
    except UnicodeDecodeError as e:
        hint = "; convert it, e.g. iconv -t UTF-8" if convert_hint else ""
        raise CharlmError(f"{flag} {shown(path)} is not UTF-8 text (invalid byte at offset {e.start}){hint}") from None
