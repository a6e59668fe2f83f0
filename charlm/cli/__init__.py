"""The charlm command line. Thin commands: parse options, call the library, print.

The command modules (data: corpus, prepare; train; decode: sample, beam, eval, info; tools: bench,
plot; viz) are the only ones that print to the terminal, own signals or exit. Library code raises
CharlmError; app.friendly turns it into one red line and exit code 1. Each command imports the
library code it needs when it runs, so `charlm sample` loads no training, corpus or prepare code.
"""

from __future__ import annotations

import sys

import typer
from rich.text import Text

# The commands, registered in the order --help lists them.
from charlm.cli import data, decode, tools, train, viz  # noqa: E402,F401,I001
from charlm.cli.app import UsageError, app, err

__all__ = ["app", "main"]



def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors become one line and exit code 1, like every other error."""
    try:
        code = app(args=argv, standalone_mode=False)
    except UsageError as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx else ""
        err.print(Text("error: ", style="bold red") + Text(e.format_message() + hint), soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        err.print(Text("error: ", style="bold red") + Text("interrupted"))
        sys.exit(1)
    except Exception as e:
        if type(e).__name__ != "Abort":  # typer's internal Abort (Ctrl-C at a prompt)
            raise
        err.print(Text("error: ", style="bold red") + Text("aborted"))
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

