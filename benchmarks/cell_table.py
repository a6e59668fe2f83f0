"""The cell table (issue 16): every cell trained for the same wall-clock budget on tiny Shakespeare,
one run per row, one after another on this machine, with the matrix roof measured in the same run.

    python benchmarks/cell_table.py [--budget 10m] [--rows lstm,gru,...] [--out DIR]

Per row: `charlm train shakespeare --preset shakespeare-cpu --dtype fp32 --cell C --rnn-size H
--time-budget B` (every cell at about the 2x512 LSTM's 3.3 M parameters), then `charlm eval
--split val+test` (the last 10% of the file), then sampling speed from the trained checkpoint (1
stream of 1,000 characters, 64 streams of 300, median of 3, temperature 0.8). Training chars/s is
the run's own average (characters seen / seconds, from its metrics.jsonl); FLOP/s counts 6 x the
weights of every matrix product per character (benchmarks/cell_speed.py). The roof is oneDNN's fp32
matrix product, measured before the first row and after the last: this CPU has no bf16 units, so
fp32 is the roof that applies (bf16 runs about 100x slower here and is refused by charlm).
Writes DIR/cell_table.json and DIR/cell_table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from charlm import checkpoint
from charlm.config import parse_duration
from charlm.decoding.sampling import processors, sample
from charlm.decoding.scorer import ModelScorer
from charlm.model import CharRNN
from charlm.tools.bench import roof

ROWS = {"lstm": 512, "gru": 592, "rnn": 1024, "peephole": 512, "mingru": 1248, "minlstm": 1024}


def charlm(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "charlm", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"charlm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def sampling_rates(path: Path) -> dict:
    ckpt = checkpoint.load(path)
    scorer = ModelScorer(ckpt.build_model().eval(), ckpt.vocab)
    prime = torch.tensor(ckpt.vocab.encode("ROMEO:"))
    rates = {}
    for streams, length in ((1, 1000), (64, 300)):
        times = []
        for r in range(3):
            start = time.perf_counter()
            sample(scorer, prime, length, processors(0.8), generator=torch.Generator().manual_seed(r), num_samples=streams)
            times.append(time.perf_counter() - start)
        rates[f"sample_{streams}_chars_per_s"] = round(streams * length / statistics.median(times))
    return rates


def flops_per_char(path: Path) -> float:
    model = CharRNN(checkpoint.load(path).model_config)
    return 6.0 * (sum(p.numel() for p in model.rnn.parameters() if p.dim() == 2) + model.head.weight.numel())


def row(cell: str, hidden: int, budget: str, out: Path, steps: int | None) -> dict:
    run_dir = out / cell
    limit = ["--max-steps", str(steps), "--time-budget", "3h"] if steps else ["--time-budget", budget]
    command = [
        "train",
        "shakespeare",
        "--preset",
        "shakespeare-cpu",
        "--dtype",
        "fp32",
        "--cell",
        cell,
        "--rnn-size",
        str(hidden),
        *limit,
        "--out",
        str(run_dir),
        "--overwrite",
    ]
    charlm(*command)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if r.get("kind") == "train"][-1]
    best = run_dir / "best.safetensors"
    evaluated = json.loads(charlm("eval", str(best), "--split", "val+test", "--json").stdout)
    ckpt = checkpoint.load(best)
    chars_per_s = last["chars_seen"] / last["elapsed_s"]
    return {
        "cell": cell,
        "size": f"2x{hidden}",
        "parameters": CharRNN(ckpt.model_config).num_parameters(),
        "steps": last["step"],
        "chars_per_s": round(chars_per_s),
        "run_chars_per_s": round(chars_per_s),
        "flops_per_char": flops_per_char(best),
        "last10_bpc": round(evaluated["bits_per_char"], 4),
        "command": "charlm " + " ".join(command[:-1]),
    }


def markdown(rows: list[dict], roofs: list[float], budget: str) -> str:
    peak = statistics.mean(roofs)
    lines = [
        f"fp32 matrix roof (oneDNN): {' / '.join(f'{r:.0f}' for r in roofs)} GFLOP/s; budget {budget} per row.",
        "",
        "| cell | size | parameters | steps | training chars/s | GFLOP/s (share of roof) | last 10% bits/char | sampling chars/s, 1 / 64 streams |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['size']} | {r['parameters']:,} | {r['steps']:,} | {r['chars_per_s']:,} | "
            f"{r['gflops']} ({r['gflops'] / peak:.0%}) | {r['last10_bpc']:.4f} | "
            f"{r.get('sample_1_chars_per_s', 0):,} / {r.get('sample_64_chars_per_s', 0):,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", type=Path, default=Path("checkpoints/cell-table"))
    ap.add_argument("--sample-only", action="store_true", help="measure sampling speed of the rows in --out")
    ap.add_argument(
        "--speeds",
        type=Path,
        help="cell_speed.py --json output: train each row for the steps its "
        "measured rate gives in --budget (on a shared machine, so that the load does not decide the quality)",
    )
    args = ap.parse_args()
    os.environ.setdefault("CHARLM_CORPUS_MIRROR", str(Path(__file__).resolve().parents[2] / "shared" / "corpora"))
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / "cell_table.json"
    if args.sample_only:  # measure sampling from the rows already trained (run this one on a quiet machine)
        table = json.loads(result_file.read_text())
        for r in table["rows"]:
            r.update(sampling_rates(args.out / r["cell"] / "best.safetensors"))
            print(r["cell"], r["sample_1_chars_per_s"], r["sample_64_chars_per_s"], flush=True)
    else:
        table = {"budget": args.budget, "rows": [], "roof_fp32_gflops": []}
        speeds = json.loads(args.speeds.read_text()) if args.speeds else {"results": {}}
        rates = {label.split()[0]: r["chars_per_s"] for label, r in speeds["results"].items() if "(" not in label}
        table["roof_fp32_gflops"] = [speeds["roof_fp32_gflops"]] if args.speeds else [roof(quick=True)["fp32_gflops"]]
        seconds = parse_duration(args.budget)
        for cell in args.rows.split(","):
            steps = round(seconds * rates[cell] / (32 * 128)) if cell in rates else None  # the preset's batch x window
            r = row(cell, ROWS[cell], args.budget, args.out, steps)
            if cell in rates:  # the rate measured side by side on a quiet machine, not under this run's load
                r["chars_per_s"] = rates[cell]
            r["gflops"] = round(r["chars_per_s"] * r["flops_per_char"] / 1e9, 1)
            table["rows"].append(r)
            print(json.dumps(r), flush=True)
            result_file.write_text(json.dumps(table, indent=1))
        if not args.speeds:
            table["roof_fp32_gflops"].append(roof(quick=True)["fp32_gflops"])
    result_file.write_text(json.dumps(table, indent=1))
    (args.out / "cell_table.md").write_text(markdown(table["rows"], table["roof_fp32_gflops"], table["budget"]))
    print(markdown(table["rows"], table["roof_fp32_gflops"], table["budget"]))


if __name__ == "__main__":
    main()
