"""Generation speed: sampling (one stream, 64 streams), beam search (width 1 vs 10), an ensemble of 3.

    python benchmarks/decode_speed.py [--rnn-size 512 --num-layers 2] [--json]

A 2x512 LSTM with a 65-symbol vocabulary and random weights (speed does not depend on the
weights), fp32. Each figure is the median of --rounds runs; every ratio compares figures from
the same run. (`charlm bench` includes these figures.)
"""

from __future__ import annotations

import argparse
import json

import torch

from charlm.tools import bench


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=512)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = bench.generation(args.num_layers, args.rnn_size, args.length, args.rounds, args.dtype)
    if args.json:
        print(json.dumps(r))
        return r
    print(
        f"{args.num_layers}x{args.rnn_size} LSTM, vocabulary 65, {args.dtype}, {torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    rows = [
        ("sample, 1 stream", f"{r['sample']['single']['chars_per_s']:,} chars/s"),
        ("sample, 64 streams (total)", f"{r['sample']['batch64']['chars_per_s']:,} chars/s"),
        ("beam width 1", f"{r['beam']['width1_ms_per_char']} ms/char"),
        ("beam width 10", f"{r['beam']['width10_ms_per_char']} ms/char ({r['beam']['width10_over_width1']}x width 1)"),
        (
            "ensemble of 3, 1 stream",
            f"{r['ensemble']['three_chars_per_s']:,} chars/s ({r['ensemble']['three_over_one']}x one model's time)",
        ),
        (
            "ensemble of 3, 64 streams",
            f"{r['ensemble']['three_batch64_chars_per_s']:,} chars/s ({r['ensemble']['three_over_one_batch64']}x one model's time)",
        ),
    ]
    for name, value in rows:
        print(f"  {name:<28} {value}")
    return r


if __name__ == "__main__":
    main()
