"""What `--dtype auto` picks on this machine against what measures fastest, for step-by-step decoding.

    python benchmarks/dtype_picks.py [--quick] [--layers 2 --hidden 512] [--threads N]

A random-init LSTM (speed does not depend on the weights): one stream, 64 streams and an ensemble of
three sampled in fp32, bf16 and int8 (bf16 and int8 only on a CPU with native bf16), in ABBA-ordered
rounds, medians. Training's pick is measured by `charlm bench` (train.fp32 / train.bf16, each in a
process of its own). Prints the machine line, a table of chars/s, and per use auto's pick and the
fastest; one JSON line at the end for the records.
"""

from __future__ import annotations

import argparse
import json

import torch

from charlm import machine, threads
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.sampling import processors, sample
from charlm.devices import cpu_has_bf16, resolve_dtype
from charlm.tools.bench import interleaved_rates, random_scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs and fewer rounds (a check that it works)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="default: what charlm picks for the kind of work")
    args = ap.parse_args()
    print(machine.describe())
    length, rounds = (60, 2) if args.quick else (600, 5)
    dtypes = ("fp32", "bf16", "int8") if cpu_has_bf16() else ("fp32",)
    one = {d: random_scorer(args.layers, args.hidden, 0, d) for d in dtypes}
    three = {
        d: Ensemble([one[d], random_scorer(args.layers, args.hidden, 1, d), random_scorer(args.layers, args.hidden, 2, d)])
        for d in dtypes
    }
    prime = torch.tensor(one["fp32"].vocab.encode("The "))
    chain = processors(0.8)

    def sampler(scorer, streams: int, n: int):
        return lambda: sample(scorer, prime, n, chain, generator=torch.Generator().manual_seed(0), num_samples=streams)

    cases = {  # use -> (kind of work for the thread count, scorers, streams, characters per stream)
        "step": ("step", one, 1, length),
        "batch": ("batch", one, 64, max(length // 4, 10)),
        "ensemble": ("step", three, 1, length // 2),
    }
    results = {}
    for use, (work, scorers, streams, n) in cases.items():
        with threads.use(work, args.threads) as used:
            rates = interleaved_rates({d: sampler(scorers[d], streams, n) for d in dtypes}, streams * n, rounds)
        pick = resolve_dtype(torch.device("cpu"), use)
        results[use] = {
            "threads": used,
            "chars_per_s": {d: round(r) for d, r in rates.items()},
            "auto": pick,
            "fastest": max(rates, key=rates.get),
        }
    print(f"{args.layers}x{args.hidden} LSTM at random init, median of {rounds} ABBA rounds")
    print(f"{'use':<10} {'threads':>7} " + " ".join(f"{d:>9}" for d in dtypes) + "   auto    fastest")
    for use, r in results.items():
        mark = "" if r["auto"] == r["fastest"] else "   <- auto is not the fastest here"
        print(
            f"{use:<10} {r['threads']:>7} "
            + " ".join(f"{r['chars_per_s'][d]:>9,}" for d in dtypes)
            + f"   {r['auto']:<7} {r['fastest']}{mark}"
        )
    print(json.dumps({"machine": machine.facts(), "model": f"{args.layers}x{args.hidden} lstm", "results": results}))


if __name__ == "__main__":
    main()
