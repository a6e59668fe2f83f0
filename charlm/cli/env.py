"""The env command: this machine in one line (CPU and ISA level, cores, threads, GPU, what auto picks)."""

from __future__ import annotations

import json

import typer
from typing_extensions import Annotated

from charlm.cli.app import app, friendly


@app.command()
@friendly
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")] = False,
):
    """Describe this machine in one line: CPU model and ISA level, cores, free cores and threads, GPU,
    and what --dtype auto picks for each use. Put it in bug reports."""
    from charlm import machine  # imported here: it imports torch

    facts = machine.facts()
    print(json.dumps(facts) if as_json else machine.describe(facts))
