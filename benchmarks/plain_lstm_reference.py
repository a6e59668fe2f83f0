"""A plain PyTorch character LSTM, the reference charlm's results are compared with (issue 4).

    python benchmarks/plain_lstm_reference.py --text corpora/linux-core/input.txt \\
        --num-layers 2 --rnn-size 512 --embed-size 64 --batch-size 32 --seq-length 128 \\
        --lr 0.002 --dropout 0.25 --time-budget 900 --seed 1337 > reference.json

Standalone on purpose: no charlm code, only what a reader would write by hand from the PyTorch
docs. nn.Embedding -> nn.LSTM -> nn.Linear (dropout on the embedding, between layers and before
the head), Adam at a constant learning rate, global-norm gradient clipping at 5, truncated BPTT
with the hidden state carried across windows and detached.

The split is charlm's: the text's characters cut contiguously 90/5/5 (train, val, test), the
vocabulary taken from the whole text. Training runs until --time-budget seconds of training
(evaluation is not counted, and there is none during training). Then, like
`charlm eval --split ...`, each split is scored as one stream, state carried through, every
character after the first predicted from those before it:
  val_bpc (the 5% after train), test_bpc (the last 5%), val_test_bpc (the last 10%, one stream).
Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EVAL_WINDOW = 512


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        out, state = self.lstm(self.drop(self.embed(x)), state)  # (B, T, H)
        return self.head(self.drop(out)), state  # (B, T, V)


def load_ids(path: str) -> tuple[np.ndarray, list[str]]:
    """The text as character ids (int32) and the sorted vocabulary."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(codepoints)
    ids = np.searchsorted(vocab, codepoints).astype(np.int32)
    return ids, [chr(c) for c in vocab]


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous 90/5/5, the same bounds as charlm prepare's default split."""
    n = len(ids)
    train_end, val_end = int(n * 0.9), int(n * (0.9 + 0.05))
    return ids[:train_end], ids[train_end:val_end], ids[val_end:]


def train(model, data: torch.Tensor, args, log) -> dict:
    """Train on B contiguous rows of the training ids, T steps per window, until the time budget."""
    rows = data[: len(data) // args.batch_size * args.batch_size].view(args.batch_size, -1).long()  # (B, N)
    windows = (rows.shape[1] - 1) // args.seq_length
    if windows < 1:
        sys.exit(f"error: the training text is shorter than one batch ({args.batch_size} x {args.seq_length + 1})")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    step, epoch, last_bpc, start, last_log = 0, 0, math.nan, time.perf_counter(), 0.0
    while True:
        state = None  # each epoch starts every row from a zero state
        for w in range(windows):
            i = w * args.seq_length
            x, y = rows[:, i : i + args.seq_length], rows[:, i + 1 : i + 1 + args.seq_length]  # (B, T)
            logits, state = model(x, state)
            state = tuple(s.detach() for s in state)  # carry the values, stop the gradients
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            last_bpc = loss.item() / math.log(2)
            elapsed = time.perf_counter() - start
            if elapsed - last_log >= 30:
                last_log = elapsed
                log(f"step {step}  epoch {epoch + w / windows:.2f}  train {last_bpc:.4f} bits/char  {elapsed:.0f}s")
            if elapsed >= args.time_budget:
                return {
                    "steps": step,
                    "epochs": round(epoch + (w + 1) / windows, 4),
                    "train_seconds": round(elapsed, 2),
                    "chars_seen": step * args.batch_size * args.seq_length,
                    "last_train_bpc": round(last_bpc, 4),
                }
        epoch += 1


@torch.inference_mode()
def stream_nll(model, ids: torch.Tensor, boundary: int | None = None) -> tuple[float, float]:
    """-log p (nats) of ids[1:] scored as one stream; also the part for targets before `boundary`."""
    model.eval()
    state, total, head = None, 0.0, 0.0
    ids = ids.long()
    for start in range(0, len(ids) - 1, EVAL_WINDOW):
        y = ids[start + 1 : start + 1 + EVAL_WINDOW]
        x = ids[start : start + len(y)]
        logits, state = model(x[None], state)  # (1, T, V)
        nll = F.cross_entropy(logits[0], y, reduction="none")  # (T,)
        total += float(nll.sum())
        if boundary is not None:
            head += float(nll[: max(0, min(len(y), boundary - (start + 1)))].sum())
    return total, head


def bpc(nll: float, n: int) -> float:
    return round(nll / math.log(2) / n, 4) if n > 0 else math.nan


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True, help="UTF-8 text file (the whole corpus)")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=512)
    ap.add_argument("--embed-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--dropout", type=float, default=0.25)
    ap.add_argument("--time-budget", type=float, default=900, help="seconds of training")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    torch.manual_seed(args.seed)
    ids, vocab = load_ids(args.text)
    train_ids, val_ids, test_ids = (torch.from_numpy(a) for a in split(ids))
    model = CharLSTM(len(vocab), args.embed_size, args.rnn_size, args.num_layers, args.dropout)
    params = sum(p.numel() for p in model.parameters())
    log(
        f"{args.num_layers}x{args.rnn_size} LSTM, {params:,} parameters, vocabulary {len(vocab)}, "
        f"train/val/test {len(train_ids):,}/{len(val_ids):,}/{len(test_ids):,} chars, {args.time_budget:g}s budget"
    )
    trained = train(model, train_ids, args, log)

    start = time.perf_counter()
    tail = torch.cat([val_ids, test_ids])
    tail_nll, val_nll = stream_nll(model, tail, boundary=len(val_ids))
    test_nll, _ = stream_nll(model, test_ids)
    report = {
        "text": args.text,
        "model": f"{args.num_layers}x{args.rnn_size} LSTM, embed {args.embed_size}, dropout {args.dropout}",
        "parameters": params,
        "vocab_size": len(vocab),
        "config": vars(args),
        **trained,
        "val_bpc": bpc(val_nll, len(val_ids) - 1),
        "test_bpc": bpc(test_nll, len(test_ids) - 1),
        "val_test_bpc": bpc(tail_nll, len(tail) - 1),
        "chars": {"train": len(train_ids), "val": len(val_ids), "test": len(test_ids)},
        "eval_seconds": round(time.perf_counter() - start, 2),
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
