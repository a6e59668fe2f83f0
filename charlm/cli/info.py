"""The info command: what a checkpoint holds, as a table or as JSON (charlm.checkpoint_info underneath)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from typing_extensions import Annotated

from charlm.cli.app import app, friendly
from charlm.terminal import shown, stdout_is_utf8

if TYPE_CHECKING:
    from rich.text import Text


def literal(text: str, limit: int = 500) -> Text:
    """Text from a file, shown as it is: never rich markup, control characters (ANSI escapes) made visible."""
    from rich.text import Text

    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text[:limit])
    return Text(text)


@app.command()
@friendly
def info(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint file.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the metadata as JSON (a figure that does not exist, such as the validation figure of a run without a validation split, is null).",
        ),
    ] = False,
):
    """Show what a checkpoint holds: model, vocabulary, training config, metrics, provenance."""
    import charlm
    from charlm.jsonsafe import finite_or_null

    c = charlm.checkpoint_info(ckpt)
    meta = c["meta"]
    if as_json:
        print(json.dumps(finite_or_null(meta), indent=1, ensure_ascii=not stdout_is_utf8(), allow_nan=False))
        return
    from rich.table import Table

    from charlm.terminal import PipeConsole

    table = Table("field", "value", title=literal(shown(ckpt)), show_lines=False)  # file contents are never rich markup
    table.add_row("format", f"{c['format']} v{c['version']}")
    checks = {
        "verified": "verified (sha256 of the weights, and of the metadata and training state)",
        "none": "none (written before checksums; unchecked)",
    }
    table.add_row("weights checksum", checks[c["checksum"]])
    vocab = c["vocab"]
    if vocab.kind == "spm":
        table.add_row("vocabulary", literal(vocab.describe()[0].upper() + vocab.describe()[1:]))
    else:
        table.add_row(
            "vocabulary",
            literal(f"{len(vocab)} {vocab.kind} symbols: {''.join(vocab.symbol(i) for i in range(min(len(vocab), 100)))!r}"),
        )
    for entry in (meta.get("provenance") or {}).get("fine_tuned_from") or []:  # newest first
        if isinstance(entry, dict):
            table.add_row(
                "fine-tuned from",
                literal(f"{entry.get('checkpoint')} (sha256 {str(entry.get('weights_sha256'))[:12]}) on {entry.get('on')}"),
            )
    for section in ("model", "metrics", "provenance", "train"):
        for k, v in meta.get(section, {}).items():
            if section == "provenance" and k == "fine_tuned_from":
                continue  # shown above, one row per step of the chain
            if isinstance(v, float):
                v = f"{v:.4f}" if math.isfinite(v) else str(v)
            table.add_row(literal(f"{section}.{k}"), literal(str(v)))
    table.add_row("training state", "yes (resumable)" if c["resumable"] else "no (weights only)")
    table.add_row("tensors", f"{c['tensors']} ({c['parameters']:,} model parameters)")
    PipeConsole().print(table)
