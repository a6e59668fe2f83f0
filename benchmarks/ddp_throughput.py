"""Data-parallel throughput on one CPU machine: 2 ranks x 1 thread (DDP over Gloo) vs 1 process x 2 threads.

    python benchmarks/ddp_throughput.py [--rnn-size 256 --num-layers 2 --batch-size 32 --seq-length 100]

Both sides run the real `charlm train` on the same synthetic prepared data and the same total
batch: `--nproc 2 --batch-size B` with OMP_NUM_THREADS=1 against one process with `--batch-size 2B`
and OMP_NUM_THREADS=2. The figure is the trainer's own chars/s (all ranks together, measured by
rank 0 over each logging interval), read from metrics.jsonl; the first interval of every run is
warm-up and dropped. Runs alternate in ABBA order so machine noise hits both alike; the report
gives the median over all timed intervals. On CPU this measures correctness's price, not a
speed-up: the point of DDP is GPUs and machines, where each rank has its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from charlm.data import prepare as prep

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ".\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def run(data: Path, out: Path, args, ranks: int) -> list[float]:
    """One training run; the chars/s of each logging interval after the first."""
    batch = args.batch_size if ranks > 1 else args.batch_size * 2
    cmd = [
        sys.executable,
        "-m",
        "charlm",
        "train",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--num-layers",
        str(args.num_layers),
        "--rnn-size",
        str(args.rnn_size),
        "--embed-size",
        "64",
        "--batch-size",
        str(batch),
        "--seq-length",
        str(args.seq_length),
        "--max-steps",
        str(args.steps * args.intervals),
        "--log-every",
        str(args.steps),
        "--eval-every",
        "1000000",
    ]
    if ranks > 1:
        cmd += ["--nproc", str(ranks)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads // ranks))
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["chars_per_s"] for r in records if r["kind"] == "train"][1:]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank; the single process takes twice this")
    ap.add_argument("--seq-length", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all, shared out among the ranks")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed interval")
    ap.add_argument("--intervals", type=int, default=5, help="intervals per run (the first is warm-up)")
    ap.add_argument("--runs", type=int, default=2, help="runs of each side, in ABBA order")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "text.txt").write_text(synthetic_text(1_500_000))
        prep.prepare([tmp / "text.txt"], tmp / "data")
        rates: dict[str, list[float]] = {"1 process x 2 threads": [], "2 ranks x 1 thread": []}
        order = [1, 2, 2, 1] * ((args.runs + 1) // 2)
        for i, ranks in enumerate(order[: 2 * args.runs]):
            name = "2 ranks x 1 thread" if ranks > 1 else "1 process x 2 threads"
            rates[name] += run(tmp / "data", tmp / f"run{i}", args, ranks)

    result = {
        "model": f"{args.num_layers}x{args.rnn_size} LSTM, seq {args.seq_length}, total batch {2 * args.batch_size}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "chars_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "intervals": {name: len(r) for name, r in rates.items()},
    }
    single, ddp = result["chars_per_s"].values()
    print(f"{result['model']}; {result['machine']}")
    print(f"{'setup':<24}{'batch':>12}{'chars/s (median)':>20}{'intervals':>11}")
    print(
        f"{'1 process x 2 threads':<24}{2 * args.batch_size:>12}{single:>20,.0f}{result['intervals']['1 process x 2 threads']:>11}"
    )
    print(f"{'2 ranks x 1 thread':<24}{f'2 x {args.batch_size}':>12}{ddp:>20,.0f}{result['intervals']['2 ranks x 1 thread']:>11}")
    print(f"ratio (2 ranks / 1 process): {ddp / single:.2f}")
    return result


if __name__ == "__main__":
    main()
