"""charlm's training step vs a plain nn.LSTM loop of the same size, measured side by side in one run.

    python benchmarks/train_step.py [--rnn-size 512 --num-layers 2 --batch-size 64 --seq-length 100]

Both loops run on the same prepared data (tiny Shakespeare if present, else synthetic text), the
same model shape (embedding -> LSTM -> linear), Adam, gradient clipping, and the state carried and
detached between windows. They alternate in ABBA-ordered rounds so machine noise hits all alike;
the report gives median chars/s and the ratios to the plain fp32 loop, which runs twice: with
charlm's allocator settings (charlm/allocator.py) and with glibc's defaults, the way a
hand-written script runs. Every contender runs in a child process of its own. (`charlm bench` runs the
same comparison on synthetic data, along with the other measurements.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.tools import bench


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=512)
    ap.add_argument("--embed-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--data", default="corpora/shakespeare/input.txt")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if Path(args.data).exists():
            data = PreparedData(prep.cached_prepare(args.data))
        else:
            data = bench.synthetic_data(Path(tmp))
        rates = bench.training(
            data,
            args.num_layers,
            args.rnn_size,
            args.embed_size,
            args.batch_size,
            args.seq_length,
            steps=args.steps,
            rounds=args.rounds,
        )
    ref = rates["reference_fp32"]["chars_per_s"]
    own = rates["reference_fp32_default_allocator"]["chars_per_s"]
    report = {
        "model": f"{args.num_layers}x{args.rnn_size} LSTM, embed {args.embed_size}, batch {args.batch_size}, seq {args.seq_length}",
        "threads": torch.get_num_threads(),
        **{k: v["chars_per_s"] for k, v in rates.items()},
        "fp32_over_reference": round(rates["fp32"]["chars_per_s"] / ref, 3),
        "bf16_over_reference": round(rates["bf16"]["chars_per_s"] / ref, 3),
        "fp32_over_default_allocator_reference": round(rates["fp32"]["chars_per_s"] / own, 3),
        "bf16_over_default_allocator_reference": round(rates["bf16"]["chars_per_s"] / own, 3),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']}, {report['threads']} threads, median of {args.rounds} rounds x {args.steps} steps")
        print(
            f"  plain nn.LSTM loop, fp32, glibc's default allocator              : "
            f"{report['reference_fp32_default_allocator']:>8,} chars/s  (B)"
        )
        print(f"  plain nn.LSTM loop, fp32, charlm's allocator settings            : {report['reference_fp32']:>8,} chars/s  (A)")
        for key, label in (("fp32", "charlm, fp32"), ("bf16", "charlm, bf16 autocast")):
            print(
                f"  {label:<65}: {report[key]:>8,} chars/s  ({report[key + '_over_reference']:.3f}x A, "
                f"{report[key + '_over_default_allocator_reference']:.3f}x B)"
            )
    return report


if __name__ == "__main__":
    main()
