"""`charlm viz --find` on a trained model against an untrained one of the same shape, and the cost of a page.

    python benchmarks/viz_find.py CKPT (--text FILE | --split test) [--find PRED ...] [--max-chars 20000]
        [--seed 0] [--save-text FILE] [--timing]

For each predicate: the best |r| any cell of any layer reaches on the trained model, and on a fresh
model of the same config (initialised with --seed), over the same text: --text, or a split of the
prepared data the checkpoint records (the test split: text the model did not train on).
--timing: `charlm viz` on that text as a user runs it (a fresh process, wall clock), and the page's size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from charlm import checkpoint
from charlm.data import PreparedData
from charlm.model import CharRNN
from charlm.viz import Options, visualize


def split_text(ckpt: Path, split: str) -> str:
    meta = checkpoint.read_meta(ckpt)
    data = PreparedData(meta["provenance"]["data_dir"])
    return data.vocab.decode(np.asarray(data.tokens(split)))


def best(summary: dict, name: str) -> str:
    top = summary["find"][name]["top"]
    return f"{abs(top[0]['r']):.3f} (L{top[0]['layer']} #{top[0]['cell']}, r {top[0]['r']:+.3f})" if top else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--text", type=Path)
    ap.add_argument("--split")
    ap.add_argument("--find", action="append", default=[])
    ap.add_argument("--max-chars", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-text", type=Path)
    ap.add_argument("--timing", action="store_true")
    a = ap.parse_args()
    text = a.text.read_text() if a.text else split_text(a.ckpt, a.split)
    text = text[: a.max_chars]
    source = str(a.text) if a.text else f"the {a.split} split of {checkpoint.read_meta(a.ckpt)['provenance']['data_dir']}"
    if a.save_text:
        a.save_text.write_text(text)
    torch.set_num_threads(torch.get_num_threads())
    ckpt = checkpoint.load(a.ckpt)
    trained = ckpt.build_model()
    torch.manual_seed(a.seed)
    untrained = CharRNN(ckpt.model_config).eval()
    cfg = ckpt.model_config
    metrics = ckpt.meta.get("metrics", {})
    print(
        f"{a.ckpt}: {cfg.num_layers}x{cfg.rnn_size} {cfg.cell}, step {metrics.get('step')}, val {metrics.get('val_bpc')} bits/char; "
        f"{len(text):,} characters of {source}; activation: "
        f"{'cell_tanh' if cfg.cell == 'lstm' else 'default'}; untrained: the same config, torch.manual_seed({a.seed})"
    )
    rows = {}
    for label, model in (("trained", trained), ("untrained", untrained)):
        t0 = time.perf_counter()
        summary, _, _ = visualize(model, ckpt.vocab, text, Options(find=a.find, top=3))
        rows[label] = summary
        print(f"{label}: {summary['bits_per_char']:.4f} bits/char, trace + find in {time.perf_counter() - t0:.1f} s")
    print(f"{'predicate':<16} {'method':<15} {'trained best |r|':<34} untrained best |r|")
    for name in a.find:
        f = rows["trained"]["find"][name]
        print(f"{name:<16} {f['method']:<15} {best(rows['trained'], name):<34} {best(rows['untrained'], name)}")
    if a.timing:
        timing(a.ckpt, text)


def timing(ckpt: Path, text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "text.txt", Path(d) / "page.html"
        src.write_text(text)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "charlm", "viz", str(ckpt), "--text", str(src), "-o", str(out)],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - t0
        print(
            f"page: charlm viz on {len(text):,} characters: {wall:.1f} s wall clock (a fresh process), "
            f"{out.stat().st_size / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
