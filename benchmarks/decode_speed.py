"""Generation speed: sampling (one stream, a batch), beam search by width, ensembles by size.

    python benchmarks/decode_speed.py [--rnn-size 512 --num-layers 2] [--json]

A 2x512 LSTM with a 65-symbol vocabulary (tiny Shakespeare's), random weights: speed does not
depend on what the weights are. Each figure is the median of --rounds timed runs; every ratio
compares figures measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from charlm.config import ModelConfig
from charlm.decode import beam_search, processors, sample
from charlm.ensemble import Ensemble
from charlm.model import CharRNN
from charlm.scorer import ModelScorer
from charlm.vocab import Vocab


def make_scorer(args, seed: int) -> ModelScorer:
    torch.manual_seed(seed)
    vocab = Vocab.from_text("".join(chr(32 + i) for i in range(64)) + "\n")
    model = CharRNN(ModelConfig(num_layers=args.num_layers, rnn_size=args.rnn_size, embed_size=64, vocab_size=len(vocab)))
    return ModelScorer(model.eval(), vocab)


def median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=512)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    one = make_scorer(args, 0)
    three = Ensemble([one, make_scorer(args, 1), make_scorer(args, 2)])
    prime = torch.tensor(one.vocab.encode("The "))
    chain = processors(0.8)
    n = args.length

    def sampler(scorer, streams=1):
        return lambda: sample(scorer, prime, n, chain, generator=torch.Generator().manual_seed(0), num_samples=streams)

    def beamer(width):
        return lambda: beam_search(one, prime, n // 4, beam_width=width)

    t_single = median_seconds(sampler(one), args.rounds)
    t_batch = median_seconds(sampler(one, 64), args.rounds)
    t_ens = median_seconds(sampler(three), args.rounds)
    t_beam1 = median_seconds(beamer(1), args.rounds) / (n // 4)
    t_beam10 = median_seconds(beamer(10), args.rounds) / (n // 4)
    report = {
        "model": f"{args.num_layers}x{args.rnn_size} LSTM, vocabulary 65, fp32, {torch.get_num_threads()} threads",
        "sample_single_chars_per_s": round(n / t_single),
        "sample_batch64_chars_per_s": round(64 * n / t_batch),
        "beam1_ms_per_char": round(1e3 * t_beam1, 3),
        "beam10_ms_per_char": round(1e3 * t_beam10, 3),
        "beam10_over_beam1": round(t_beam10 / t_beam1, 2),
        "ensemble3_chars_per_s": round(n / t_ens),
        "ensemble3_over_single": round(t_ens / t_single, 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']}, median of {args.rounds} rounds")
        rows = [
            ("sample, 1 stream", f"{report['sample_single_chars_per_s']:,} chars/s"),
            ("sample, 64 streams (total)", f"{report['sample_batch64_chars_per_s']:,} chars/s"),
            ("beam width 1", f"{report['beam1_ms_per_char']} ms/char"),
            ("beam width 10", f"{report['beam10_ms_per_char']} ms/char  ({report['beam10_over_beam1']}x width 1)"),
            ("ensemble of 3, 1 stream", f"{report['ensemble3_chars_per_s']:,} chars/s  ({report['ensemble3_over_single']}x one model's time)"),
        ]
        for name, value in rows:
            print(f"  {name:<28} {value}")
    return report


if __name__ == "__main__":
    main()
