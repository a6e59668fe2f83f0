"""Commands about the machine and the runs rather than the models: bench and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from charlm.cli.app import app, err, friendly
from charlm.terminal import PipeConsole


@app.command()
@friendly
def bench(
    quick: Annotated[bool, typer.Option(help="A smaller run, under a minute.")] = False,
    num_layers: Annotated[int, typer.Option(help="LSTM layers of the measured model.")] = 2,
    rnn_size: Annotated[int, typer.Option(help="LSTM width of the measured model.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Training batch.")] = 64,
    seq_length: Annotated[int, typer.Option(help="Training window.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
):
    """Measure this machine: matrix-product roof, training, sampling, beam, ensemble, prepare speed."""
    from charlm.tools import bench as b  # imported here: only this command needs it

    r = b.run_all(quick, num_layers, rnn_size, batch_size, seq_length, progress=lambda s: err.print(f"measuring {s} ..."))
    if as_json:
        print(json.dumps(r))
        return
    err.print(
        r["machine"]["line"], soft_wrap=True, markup=False, highlight=False
    )  # the machine in one line: bug reports quote it
    t, roof = r["train"], r["roof"]
    table = Table(
        "what", "measured", "note", title=f"charlm bench ({r['machine']['threads']} threads, torch {r['machine']['torch']})"
    )
    table.add_row(
        "roof fp32", f"{roof['fp32_gflops']:,.0f} GFLOP/s", "best of torch.mm and oneDNN, square and LSTM-shaped products"
    )
    if "bf16_gflops" in roof:
        table.add_row(
            "roof bf16", f"{roof['bf16_gflops']:,.0f} GFLOP/s", f"{roof['bf16_gflops'] / roof['fp32_gflops']:.1f}x fp32"
        )
    else:
        table.add_row("roof bf16", "-", "this CPU has no native bf16: bf16 and int8 rows are left out")
    rows = (
        ("reference_fp32_default_allocator", "train, plain nn.LSTM loop, fp32, glibc malloc"),
        ("reference_fp32", "train, plain nn.LSTM loop, fp32"),
        ("fp32", "train, charlm fp32"),
        ("bf16", "train, charlm bf16"),
    )
    for key, label in [(k, label) for k, label in rows if k in t]:
        note = f"{t[key]['gflops']:,.0f} GFLOP/s = {t[key]['fraction_of_roof']:.0%} of the {'bf16' if key == 'bf16' else 'fp32'} roof"
        if key == "reference_fp32_default_allocator":
            note += "; glibc's default allocator, as a hand-written script runs"
        elif key == "reference_fp32":
            note += "; with charlm's allocator settings: the reference"
        else:
            note += (
                f"; {t[key + '_over_reference']:.2f}x the reference, "
                f"{t[key + '_over_default_allocator_reference']:.2f}x with glibc malloc"
            )
        table.add_row(label, f"{t[key]['chars_per_s']:,} chars/s", note)
    add_decoding_rows(table, r)
    table.add_row("prepare", f"{r['prepare']['mb_per_s']:,} MB/s", f"{r['prepare']['megabytes']} MiB synthetic ASCII text")
    PipeConsole().print(table)
    PipeConsole().print(f"model: {t['model']}; allocator: {r['machine']['allocator']}")


def add_decoding_rows(table: Table, r: dict) -> None:
    """bench's rows for sampling (1 and 64 streams, int8), beam search and ensembles."""
    for case, label in (("single", "sample, 1 stream"), ("batch64", "sample, 64 streams")):
        row = r["sample"][case]
        table.add_row(
            label,
            f"{row['chars_per_s']:,} chars/s",
            f"{row['dtype']} products" + (", total over the batch" if case == "batch64" else ""),
        )
    s8 = r.get("sample_int8")
    if s8:
        table.add_row(
            "sample, int8 weights",
            f"{s8['single']['chars_per_s']:,} / {s8['batch64']['chars_per_s']:,} chars/s",
            "1 / 64 streams; int8 weights with a scale per row, bf16 activations",
        )
    for dtype in r["beam"]:
        beam, ens = r["beam"][dtype], r["ensemble"][dtype]
        table.add_row(
            f"beam width 1 / 10, {dtype}",
            f"{beam['width1_ms_per_char']} / {beam['width10_ms_per_char']} ms/char",
            f"width 10 costs {beam['width10_over_width1']}x width 1",
        )
        table.add_row(
            f"ensemble of 3, {dtype}",
            f"{ens['three_chars_per_s']:,} / {ens['three_batch64_chars_per_s']:,} chars/s",
            f"1 / 64 streams: {ens['three_over_one']}x / {ens['three_over_one_batch64']}x one model's time",
        )


@app.command()
@friendly
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A training run's --out dir (holding metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The PNG to write; default RUN_DIR/loss.png.")] = None,
):
    """Draw train and validation bits/char against characters seen, from RUN_DIR/metrics.jsonl, as a PNG."""
    from charlm.tools.plot import (
        plot_run,  # imported here: matplotlib is optional and only this command needs it
    )

    err.print(f"wrote {plot_run(run_dir, out)}", soft_wrap=True)
