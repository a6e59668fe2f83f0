"""Training throughput of every cell, side by side in one process: chars/s and FLOP/s as a share of
the matrix-product roof measured in the same run (issue 16's cell table, and its "measure which").

    python benchmarks/cell_speed.py [--rounds 5] [--steps 3] [--json OUT]

Each contender is a full training step (forward, cross-entropy, backward, clipping, AdamW) of a
CharRNN with the shakespeare-cpu preset's batch (32 x 128), timed in ABBA-ordered rounds (the
order reverses every round, so drift in the machine's speed falls on all alike); medians reported.
Contenders: every registered cell at about the same parameter count as the 2x512 LSTM, plus the
alternatives of the new cells' training paths: the peephole LSTM through autograd (the same
equations, the input product batched, no kernel of its own) and the minimal cells' parallel
log-space scan (the form CUDA uses) against the sequential one.

FLOPs per character: 6 x the weights of every matrix product (forward 2, backward 4: the cell's
matrices and the head); pointwise work is not counted, so a cell that spends its time there shows
a low share of the roof.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from charlm.allocator import keep_freed_memory
from charlm.cells import Cell
from charlm.cells.peephole import Peephole
from charlm.config import ModelConfig
from charlm.model import CharRNN
from charlm.tools.bench import roof

VOCAB, BATCH, SEQ = 65, 32, 128
# (label, cell, layers, hidden, variant): about 3.3 M parameters each, the 2x512 LSTM's count
CONTENDERS = [
    ("lstm 2x512", "lstm", 2, 512, None),
    ("gru 2x592", "gru", 2, 592, None),
    ("rnn 2x1024", "rnn", 2, 1024, None),
    ("peephole 2x512", "peephole", 2, 512, None),
    ("peephole 2x512 (autograd)", "peephole", 2, 512, "autograd"),
    ("mingru 2x1248", "mingru", 2, 1248, None),
    ("mingru 2x1248 (log scan)", "mingru", 2, 1248, "log"),
    ("minlstm 2x1024", "minlstm", 2, 1024, None),
    ("minlstm 2x1024 (log scan)", "minlstm", 2, 1024, "log"),
]


def peephole_autograd(cell: Peephole, x: torch.Tensor, state):
    """The peephole LSTM through autograd: the window's input product at once, then layer_step's
    equations per step with the input product taken out (what a user would write without a kernel)."""
    h0, c0 = state
    out, hs, cs = x, [], []
    for k in range(cell.num_layers):
        w_ih, w_hh, b, (p_i, p_f, p_o) = cell.weights(k)
        xp, h, c, steps = F.linear(out, w_ih, b), h0[k], c0[k], []
        for t in range(x.shape[1]):
            i, f, g, o = (xp[:, t] + h @ w_hh.t()).chunk(4, dim=1)
            i, f = (i + p_i * c).sigmoid(), (f + p_f * c).sigmoid()
            c = f * c + i * g.tanh()
            h = (o + p_o * c).sigmoid() * c.tanh()
            steps.append(h)
        out = torch.stack(steps, dim=1)
        hs.append(h)
        cs.append(c)
    return out, (torch.stack(hs), torch.stack(cs))


def make_step(cell: str, layers: int, hidden: int, variant: str | None):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, num_layers=layers, rnn_size=hidden, embed_size=64, vocab_size=VOCAB)).train()
    if variant == "log":
        model.rnn.scan = "log"
    if variant == "autograd":
        model.rnn.forward = lambda x, state: peephole_autograd(model.rnn, x, state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    state = model.init_state(BATCH)

    def step():
        nonlocal state
        logits, new = model(ids[:, :-1], state)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        state = tuple(s.detach() for s in new)

    weights = sum(p.numel() for p in model.rnn.parameters() if p.dim() == 2) + model.head.weight.numel()
    return step, model.num_parameters(), 6.0 * weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed call")
    ap.add_argument("--only", help="comma-separated cell names")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    keep_freed_memory()
    chosen = [c for c in CONTENDERS if not args.only or c[1] in args.only.split(",")]
    peak = roof(quick=True)["fp32_gflops"]
    runners = {label: make_step(cell, layers, hidden, variant) for label, cell, layers, hidden, variant in chosen}
    for step, _, _ in runners.values():
        step()  # warm-up: allocations, oneDNN primitives
    times: dict[str, list[float]] = {label: [] for label in runners}
    order = list(runners)
    for r in range(args.rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                runners[label][0]()
            times[label].append(time.perf_counter() - start)
    results = {}
    print(
        f"fp32 matrix roof (oneDNN, measured now): {peak:.0f} GFLOP/s; batch {BATCH} x {SEQ}, {torch.get_num_threads()} threads"
    )
    print(f"{'contender':28s} {'params':>10s} {'chars/s':>9s} {'GFLOP/s':>8s} {'roof':>6s}")
    for label, (_, params, fpc) in runners.items():
        rate = args.steps * BATCH * SEQ / statistics.median(times[label])
        results[label] = {
            "parameters": params,
            "chars_per_s": round(rate),
            "gflops": round(rate * fpc / 1e9, 1),
            "share_of_roof": round(rate * fpc / 1e9 / peak, 3),
        }
        print(f"{label:28s} {params:>10,d} {rate:>9,.0f} {rate * fpc / 1e9:>8.1f} {rate * fpc / 1e9 / peak:>6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roof_fp32_gflops": peak, "batch": BATCH, "seq": SEQ, "results": results}, f, indent=1)


if __name__ == "__main__":
    assert issubclass(Peephole, Cell)
    main()
