"""A long prime, stepped (the old way) against windowed (run_prime, the new way): time and peak memory.

    python benchmarks/prime_speed.py [--chars 1000000] [--num-layers 2 --rnn-size 512] [--json]

The old code ran a prime one symbol at a time through the step decoder (scorer.step); the new
code runs it through the whole-window forward pass
in 4,096-symbol windows (charlm/decoding/scorer.py run_prime), the state carried from window to
window. The model is the 2x512 LSTM of the *-cpu presets (embed 64) with random weights (speed
does not depend on them) over the prime's own characters; fp32.

Each way runs in a process of its own, so that its peak resident memory (ru_maxrss) is its own.
Stepping a 1 MB prime through a 2x512 model takes many minutes on a small CPU: the stepped figure
is timed over --stepped-chars symbols (default 20,000) and scaled to the whole prime (stepping is
linear in the length: one identical step per symbol); --stepped-chars 0 steps the whole prime.
Both figures come from the same run on the same machine; the ratio compares them.

Measured (benchmarks/results/prime_speed.txt, 1 thread of a shared 2-core EPYC): 14x on a 1x32
model, 3.1x on 2x128, 1.1x on 2x512. The window removes each step's fixed cost (the Python call,
the head and softmax per symbol); what it cannot remove is the recurrence itself, one matrix-vector
product per layer per symbol, which is nearly all of a 2x512 model's step either way. Peak memory
is flat in the prime's length for both (a 10 MB prime: tests/test_prime_windows.py).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex; "
    "First Citizen: Before we proceed any further, hear me speak. ROMEO: But, soft!"
).split()


def prime_text(chars: int, seed: int = 0) -> str:
    """A deterministic text of `chars` characters: lines of words, with some punctuation."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:chars]


def measure(way: str, chars: int, layers: int, rnn_size: int, stepped_chars: int, threads: int) -> dict:
    """In this process: build the model, run the prime the given way, report seconds and peak memory."""
    import numpy as np
    import torch

    from charlm.config import ModelConfig
    from charlm.decoding.scorer import ModelScorer, run_prime
    from charlm.model import CharRNN
    from charlm.tokenizers.vocab import Vocab

    torch.set_num_threads(threads)
    text = prime_text(chars)
    vocab = Vocab("char", sorted({ord(c) for c in text}))
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell="lstm", num_layers=layers, rnn_size=rnn_size, embed_size=64, vocab_size=len(vocab)))
    scorer = ModelScorer(model, vocab, "fp32")
    ids = torch.from_numpy(np.asarray(vocab.encode(text), dtype=np.int64))
    start = time.perf_counter()
    if way == "windowed":
        logp, _ = run_prime(scorer, ids)
        done = len(ids)
    else:
        done = len(ids) if stepped_chars <= 0 else min(stepped_chars, len(ids))
        state = scorer.start(1)
        for i in range(done):
            logp, state = scorer.step(ids[i : i + 1], state)
    seconds = time.perf_counter() - start
    assert bool(torch.isfinite(logp).all())
    return {
        "way": way,
        "chars": len(ids),
        "chars_timed": done,
        "seconds_timed": round(seconds, 3),
        "seconds": round(seconds * len(ids) / done, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_child(way: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        way,
        "--chars",
        str(args.chars),
        "--num-layers",
        str(args.num_layers),
        "--rnn-size",
        str(args.rnn_size),
        "--stepped-chars",
        str(args.stepped_chars),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=1_000_000, help="prime length in characters")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=512)
    ap.add_argument("--stepped-chars", type=int, default=20_000, help="symbols the stepped way is timed over (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", choices=["stepped", "windowed"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.measure:
        r = measure(args.measure, args.chars, args.num_layers, args.rnn_size, args.stepped_chars, args.threads)
        print(json.dumps(r))
        return r
    stepped, windowed = run_child("stepped", args), run_child("windowed", args)
    r = {
        "model": f"{args.num_layers}x{args.rnn_size} lstm",
        "threads": args.threads,
        "stepped": stepped,
        "windowed": windowed,
        "speedup": round(stepped["seconds"] / windowed["seconds"], 1),
    }
    if args.json:
        print(json.dumps(r))
        return r
    print(f"a {args.chars:,}-character prime through a {r['model']} (random weights), fp32, {args.threads} thread(s)")
    for row in (stepped, windowed):
        timed = "" if row["chars_timed"] == row["chars"] else f" (timed over {row['chars_timed']:,}: {row['seconds_timed']} s)"
        print(f"  {row['way']:>8}: {row['seconds']:>9,.2f} s{timed}, peak memory {row['peak_rss_mb']:,.0f} MB")
    print(f"  windowed is {r['speedup']}x faster")
    return r


if __name__ == "__main__":
    main()
