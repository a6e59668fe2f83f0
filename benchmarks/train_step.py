"""charlm's training step vs a plain nn.LSTM loop of the same size, measured side by side in one run.

    python benchmarks/train_step.py [--rnn-size 512 --num-layers 2 --batch-size 64 --seq-length 100 --dtype fp32]

Both loops run on the same prepared data (tiny Shakespeare if present, else synthetic text), the
same model shape (embedding -> LSTM -> linear), Adam, gradient clipping, and the state carried
and detached between windows. They alternate in rounds so machine noise hits both alike; the
report gives the median chars/s of each and the ratio charlm / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm import prepare as prep
from charlm.config import ModelConfig, TrainConfig
from charlm.data import PreparedData
from charlm.scorer import autocast_for
from charlm.train import Trainer


class PlainLSTM(nn.Module):
    def __init__(self, vocab, embed, hidden, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def plain_runner(data: PreparedData, args):
    """The loop people write by hand: slice, forward, loss, backward, clip, step."""
    torch.manual_seed(0)
    V = len(data.vocab)
    model = PlainLSTM(V, args.embed_size, args.rnn_size, args.num_layers)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    tokens = np.asarray(data.tokens("train"))
    B, T = args.batch_size, args.seq_length
    L = (len(tokens) - 1) // B
    xs = torch.from_numpy(tokens[: B * L].astype(np.int64)).view(B, L)
    ys = torch.from_numpy(tokens[1 : B * L + 1].astype(np.int64)).view(B, L)
    pos = {"k": 0, "state": None}
    device = torch.device("cpu")

    def step():
        k = pos["k"]
        if (k + 1) * T > L:
            k, pos["state"] = 0, None
        x, y = xs[:, k * T : (k + 1) * T], ys[:, k * T : (k + 1) * T]
        with autocast_for(device, args.dtype):
            logits, state = model(x, pos["state"])
        loss = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
        pos["state"] = tuple(s.detach() for s in state)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        pos["k"] = k + 1

    return step


def charlm_runner(data: PreparedData, args, out_dir: Path):
    model_cfg = ModelConfig(cell="lstm", num_layers=args.num_layers, rnn_size=args.rnn_size, embed_size=args.embed_size)
    cfg = TrainConfig(batch_size=args.batch_size, seq_length=args.seq_length, device="cpu", dtype=args.dtype)
    trainer = Trainer(model_cfg, cfg, data, out_dir)
    loss_sum = torch.zeros(())
    return lambda: trainer._train_step(loss_sum)


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=512)
    ap.add_argument("--embed-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=100)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--data", default="corpora/shakespeare/input.txt")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.data)
        if not src.exists():
            src = Path(tmp) / "synthetic.txt"
            rng = np.random.default_rng(0)
            src.write_text("".join(rng.choice(list("abcdefghij klmnop\n"), 2_000_000)))
        data = PreparedData(prep.cached_prepare(src))
        runners = {"charlm": charlm_runner(data, args, Path(tmp) / "run"), "plain": plain_runner(data, args)}
        chars = args.steps * args.batch_size * args.seq_length
        rates = {name: [] for name in runners}
        for step in runners.values():
            timed(step, 3)  # warm-up: allocator, oneDNN primitives
        order = list(runners)
        for _ in range(args.rounds):
            order.reverse()  # ABBA: neither loop always runs right after the other
            for name in order:
                rates[name].append(chars / timed(runners[name], args.steps))
    med = {name: statistics.median(r) for name, r in rates.items()}
    report = {
        "model": f"{args.num_layers}x{args.rnn_size} LSTM, embed {args.embed_size}, batch {args.batch_size}, seq {args.seq_length}, {args.dtype}",
        "threads": torch.get_num_threads(),
        "plain_chars_per_s": round(med["plain"]),
        "charlm_chars_per_s": round(med["charlm"]),
        "ratio": round(med["charlm"] / med["plain"], 3),
        "rounds": {k: [round(x) for x in v] for k, v in rates.items()},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']}, {report['threads']} threads, median of {args.rounds} rounds x {args.steps} steps")
        print(f"  plain nn.LSTM loop : {report['plain_chars_per_s']:>8,} chars/s")
        print(f"  charlm train step  : {report['charlm_chars_per_s']:>8,} chars/s")
        print(f"  ratio charlm/plain : {report['ratio']:.3f}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
