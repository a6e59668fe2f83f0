"""What an ensemble of three costs per character against one model, per decoding dtype, one stream.

    python benchmarks/ensemble_cost.py [--dtypes fp32,bf16,int8] [--rounds 8] [--length 400]

Three 2x512 LSTMs with different random weights (65 symbols); sampling --length characters from
model 1 alone and from the ensemble of all three, alternating in ABBA-ordered rounds. Prints
the chars/s of each (medians), the ratio of the median times, and each round's own ratio: the
spread shows how much the figure depends on the moment (how much of the shared L3 cache the
three models' weights get). The same ensemble with its members stepped one by one (no
decoding/stepper.py: one decoder over all members) runs in the same rounds, for the before/after comparison.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from charlm.decoding.ensemble import Ensemble
from charlm.decoding.sampling import processors, sample
from charlm.tools import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--length", type=int, default=400)
    args = ap.parse_args()
    print(f"2x512 LSTM, one stream, {args.length} characters per run, {args.rounds} rounds, {torch.get_num_threads()} threads")
    for dtype in args.dtypes.split(","):
        members = [bench.random_scorer(2, 512, seed, dtype) for seed in range(3)]
        prime = torch.tensor(members[0].vocab.encode("The "))
        chain = processors(0.8)
        separate = Ensemble(members)
        separate._stacked = False  # the members stepped one by one (before the members were stacked)
        runs = {
            name: (lambda s=scorer: sample(s, prime, args.length, chain, generator=torch.Generator().manual_seed(0)))
            for name, scorer in (("one", members[0]), ("three", Ensemble(members)), ("separate", separate))
        }
        times = bench.interleaved_times(runs, args.rounds)
        one, three, sep = (statistics.median(times[k]) for k in ("one", "three", "separate"))
        per_round = sorted(b / a for a, b in zip(times["one"], times["three"]))
        print(
            f"{dtype}: one model {args.length / one:,.0f} chars/s, ensemble of 3 {args.length / three:,.0f} chars/s, "
            f"{three / one:.2f}x; per round {' '.join(f'{r:.2f}' for r in per_round)}; "
            f"members stepped one by one: {args.length / sep:,.0f} chars/s, {sep / one:.2f}x"
        )


if __name__ == "__main__":
    main()
