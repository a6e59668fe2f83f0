"""Dynamic vs static evaluation: bits/char and chars/s, the RMS-normalised update against plain SGD.

    python benchmarks/dynamic_eval.py CKPT [--split test | --text FILE] [--data DIR] [--limit CHARS]
        [--rms LR:DECAY ...] [--sgd LR:DECAY ...] [--window N] [--epsilon E] [--json OUT.json]

Scores the text once statically (`charlm eval`'s path: one stream, the state carried through)
and once per dynamic setting (charlm/decoding/dynamic.py), each from the trained weights, all in
one process, so the chars/s columns compare like with like. With no --rms/--sgd, the defaults of
`charlm eval --dynamic` (both rules). The text: a split of the checkpoint's prepared data (or of
--data DIR, another corpus: its text is decoded and re-encoded with the model's vocabulary,
dropping symbols the model does not know, as `--unknown skip` does), or a UTF-8 --text file;
--limit keeps its first CHARS characters (for tuning on a part of val). A CKPT without optimizer
state (best.safetensors) has no statistics for the RMS rule: then only SGD settings run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from charlm import checkpoint
from charlm.data import PreparedData
from charlm.decoding import dynamic
from charlm.decoding.evaluate import evaluate
from charlm.decoding.scorer import ModelScorer


def text_tokens(ckpt, args) -> tuple[np.ndarray, str]:
    vocab = ckpt.vocab
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
        source = args.text
    else:
        data = PreparedData(args.data or ckpt.meta["provenance"]["data_dir"])
        ids = np.asarray(data.tokens(args.split))
        if args.data is None and args.limit is None:
            return ids, f"{data.dir.name}:{args.split}"
        text = data.vocab.decode(ids[: args.limit] if args.limit else ids)
        source = f"{data.dir.name}:{args.split}"
    if args.limit:
        text = text[: args.limit]
        source += f" (first {args.limit:,} chars)"
    return np.asarray(vocab.encode(text, "skip")), source


def setting(spec: str, update: str) -> dynamic.Settings:
    lr, decay = (float(v) for v in spec.split(":"))
    return dynamic.Settings(update, lr, decay, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="test")
    ap.add_argument("--data")
    ap.add_argument("--text")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--rms", nargs="*", default=None, metavar="LR:DECAY")
    ap.add_argument("--sgd", nargs="*", default=None, metavar="LR:DECAY")
    ap.add_argument("--window", type=int)
    ap.add_argument("--epsilon", type=float, help=f"the RMS rule's epsilon (default {dynamic.EPSILON})")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.epsilon is not None:
        dynamic.EPSILON = args.epsilon
    ckpt = checkpoint.load(args.checkpoint)
    source = dynamic.adapt_source(ckpt)
    tokens, described = text_tokens(ckpt, args)
    window = args.window or source.window
    if args.rms is None and args.sgd is None:
        args.rms, args.sgd = (
            [f"{dynamic.DEFAULTS['rms'][0]}:{dynamic.DEFAULTS['rms'][1]}"],
            [f"{dynamic.DEFAULTS['sgd'][0]}:{dynamic.DEFAULTS['sgd'][1]}"],
        )
    settings = [setting(s, "rms") for s in (args.rms or []) if source.mean_sq is not None]
    settings += [setting(s, "sgd") for s in (args.sgd or [])]
    print(f"{args.checkpoint} on {described}: {len(tokens):,} tokens, window {window}, {torch.get_num_threads()} thread(s)")
    start = time.perf_counter()
    static = evaluate(ModelScorer(ckpt.build_model(), ckpt.vocab), tokens)
    static["chars_per_s"] = static["chars"] / (time.perf_counter() - start)
    rows = [{"update": "static", "lr": 0.0, "decay": 0.0, **static}]
    print(f"{'update':<8} {'lr':>8} {'decay':>8} {'bits/char':>10} {'change':>8} {'chars/s':>9}")
    print(f"{'static':<8} {'':>8} {'':>8} {static['bits_per_char']:>10.4f} {'':>8} {static['chars_per_s']:>9,.0f}", flush=True)
    for s in settings:
        s.window = window
        adapter = dynamic.Adapter(ckpt.build_model(), s, source.mean_sq)
        result, _ = dynamic.dynamic_evaluate([adapter], tokens)
        rows.append({"update": s.update, "lr": s.lr, "decay": s.decay, **result})
        change = result["bits_per_char"] - static["bits_per_char"]
        print(
            f"{s.update:<8} {s.lr:>8g} {s.decay:>8g} {result['bits_per_char']:>10.4f} {change:>+8.4f} {result['chars_per_s']:>9,.0f}",
            flush=True,
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "checkpoint": args.checkpoint,
            "source": described,
            "window": window,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
