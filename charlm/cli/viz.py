"""charlm viz: a page that shows what each cell of a model tracks over a text, and where it is unsure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text
from typing_extensions import Annotated

from charlm.cli.app import app, err, friendly, read_text_file
from charlm.errors import CharlmError
from charlm.terminal import PipeConsole, stdout_is_utf8

MAX_CHARS = 20_000


def read_text(path: Path, max_chars: int) -> tuple[str, Optional[int]]:
    """The file as UTF-8 (a leading BOM dropped), capped at max_chars; and its length when it was cut."""
    if max_chars < 1:
        raise CharlmError(f"--max-chars must be at least 1 (got {max_chars})")
    text = read_text_file("--text", path)
    if not text:
        raise CharlmError(f"--text {path} is empty")
    return (text[:max_chars], len(text)) if len(text) > max_chars else (text, None)


def _cells(values: list[str]) -> list[int]:
    """--cell 3 --cell 17, or --cell 3,17."""
    out = []
    for v in values:
        for part in v.split(","):
            try:
                out.append(int(part))
            except ValueError:
                raise CharlmError(f"--cell expects cell numbers, e.g. --cell 3 --cell 17 or --cell 3,17 (got {v!r})") from None
    return out


@app.command()
@friendly
def viz(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint file.", show_default=False)],
    text: Annotated[Path, typer.Option(help="The UTF-8 text to run through the model.", show_default=False)],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="The HTML page to write; default TEXT's name + .viz.html in this directory."),
    ] = None,
    layer: Annotated[
        Optional[int], typer.Option(help="The layer of the --cell numbers: 0 is the lowest; default the top one.")
    ] = None,
    cell: Annotated[
        List[str],
        typer.Option(
            help="Cell (unit) numbers to colour by, 0-based: --cell 3 --cell 17, or --cell 3,17. Default: the cells that vary most (or, with --find, the best ones)."
        ),
    ] = [],
    show: Annotated[
        Optional[str],
        typer.Option(
            help="Which internal colours the text: cell_tanh (an LSTM's cell state through tanh; the default where there is one), hidden, a gate (input_gate, forget_gate, ...): see the error for what a cell has."
        ),
    ] = None,
    find: Annotated[
        List[str],
        typer.Option(
            help="Rank every cell of every layer by how well it tracks a property: quote, line-position, bracket-depth, comment, indent, or regex:PATTERN (inside a match). Repeatable."
        ),
    ] = [],
    top: Annotated[int, typer.Option(help="Cells listed per --find property.")] = 10,
    max_chars: Annotated[int, typer.Option(help="Show at most this many characters of the text (the first ones).")] = MAX_CHARS,
    png: Annotated[
        Optional[Path],
        typer.Option(help="Also draw the gate-saturation scatter to this PNG (needs matplotlib).", show_default=False),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the numbers as one JSON object on stdout (rankings, gate saturation, surprising spans)."
        ),
    ] = False,
    unknown: Annotated[
        str, typer.Option(help="Characters outside a char vocabulary: error, or skip (left out of the page).")
    ] = "error",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "cpu",
):
    """Write a self-contained HTML page: the text coloured by a cell's activation or by the bits each character cost, the model's next-character predictions on hover, --find rankings and gate saturation."""
    from charlm import checkpoint, config  # imported here: `charlm --help` stays light
    from charlm.decoding.options import check_unknown
    from charlm.devices import pick_device
    from charlm.viz import Options, page, visualize
    from charlm.viz import png as png_mod

    check_unknown(unknown)
    if device not in config.DEVICES:
        raise CharlmError(f"--device must be one of {', '.join(config.DEVICES)} (got {device!r})")
    opts = Options(show=show, layer=layer, cells=_cells(cell), find=list(find), top=top)
    content, full_length = read_text(text, max_chars)
    ckpt_data = checkpoint.load(ckpt)
    model = ckpt_data.build_model().to(pick_device(device))
    cfg = ckpt_data.model_config
    about = {
        "checkpoint": str(ckpt),
        "model": f"{cfg.num_layers}x{cfg.rnn_size} {cfg.cell}, {ckpt_data.vocab.describe()}",
        "source": str(text),
        "truncated_from": full_length,
    }
    out = out if out is not None else Path(text.name + ".viz.html")
    summary, data, _ = visualize(model, ckpt_data.vocab, content, opts, unknown, about)
    size = page.write(out, page.render(data, f"{ckpt.name} on {text.name}"))
    if png is not None:
        png_mod.gate_scatter(summary["gates"], png, f"{ckpt.name}: gate saturation on {text.name}")
    if full_length is not None:
        err.print(f"the text has {full_length:,} characters: the page shows the first {len(data['text']):,} (--max-chars)")
    err.print(f"wrote {out} ({size / 1e6:.2f} MB)" + (f" and {png}" if png is not None else ""), soft_wrap=True)
    if as_json:
        print(json.dumps(summary, allow_nan=False, ensure_ascii=not stdout_is_utf8()))
        return
    _print_tables(summary)


def _print_tables(summary: dict) -> None:
    console = PipeConsole()
    for name, f in summary["find"].items():
        table = Table("rank", "layer", "cell", "r", title=f"--find {name} ({f['method']}), {summary['show']}")
        for k, r in enumerate(f["top"], 1):
            table.add_row(str(k), str(r["layer"]), str(r["cell"]), f"{r['r']:+.3f}")
        if f["top"]:
            console.print(table)
        else:
            err.print(f"--find {name}: the property is the same at every character of this text; nothing to rank", soft_wrap=True)
    table = Table("bits/char", "span", title="the most surprising spans")
    for s in summary["surprising_spans"][:5]:
        table.add_row(f"{s['bits_per_char']:.2f}", Text(repr(s["text"])))
    console.print(table)
