"""Put a trace together: the cells to show, the --find rankings, gate saturation, the surprising spans.

`build` returns the summary (what --json prints) and the page's data (the summary plus the
per-character arrays, compact: activations as int8 in base64, probabilities per mille).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from charlm.errors import CharlmError
from charlm.viz import gates, predicates, surprise
from charlm.viz.trace import Trace

RENDER_PER_PREDICATE = 3  # --find's best cells carried into the page, per predicate
DEFAULT_CELLS = 5  # without --cell or --find: the cells whose activation varies most


@dataclass
class Options:
    show: str | None = None  # the internal to colour by (default: cell_tanh, else hidden)
    layer: int | None = None  # default: the top layer
    cells: list[int] = field(default_factory=list)
    find: list[str] = field(default_factory=list)
    top: int = 10


def default_show(names) -> str:
    """The cell state through tanh where the cell has one, else its hidden output."""
    for name in ("cell_tanh", "hidden"):
        if name in names:
            return name
    return next(iter(names))


def check(names, layers: int, hidden: int, opts: Options) -> tuple[str, int]:
    """The internal and layer the options ask for, or a CharlmError naming what exists; --find's specs checked too."""
    show = opts.show or default_show(names)
    if show not in names:
        raise CharlmError(f"--show must be one of this cell's internals: {', '.join(names)} (got {show!r})")
    layer = layers - 1 if opts.layer is None else opts.layer
    if not 0 <= layer < layers:
        raise CharlmError(f"--layer must be between 0 and {layers - 1}: the model has {layers} layer(s) (got {layer})")
    bad = [c for c in opts.cells if not 0 <= c < hidden]
    if bad:
        raise CharlmError(f"--cell must be between 0 and {hidden - 1}: each layer has {hidden} cells (got {bad[0]})")
    if opts.top < 1:
        raise CharlmError(f"--top must be at least 1 (got {opts.top})")
    for spec in opts.find:
        predicates.predicate(spec)
    return show, layer


def build(trace: Trace, opts: Options, vocab, about: dict | None = None) -> tuple[dict, dict]:
    """(summary, page data) for a trace; see the module docstring. `about`: fields put first (model, source)."""
    show, layer = check(tuple(trace.acts), trace.num_layers, trace.hidden_size, opts)
    preds = [predicates.predicate(p) for p in opts.find]  # every spec checked before any work
    finder = predicates.Finder(trace.per_char(show))  # (C, L, H)
    found = {}
    for p in preds:
        target = p.fn(trace.text)
        extent = _extent(target, p.binary)
        varies = 0 < extent < len(target) if p.binary else extent > 1  # a constant property tracks nothing
        found[p.name] = {
            "method": p.method,
            "positives" if p.binary else "distinct": extent,
            "top": finder.top(target, p.binary, opts.top) if varies else [],
        }
    views = [(layer, c, "cell") for c in opts.cells]
    for name, f in found.items():
        views += [(r["layer"], r["cell"], f"{name}: r = {r['r']:+.2f}") for r in f["top"][:RENDER_PER_PREDICATE]]
    if not views:
        spread = trace.acts[show][:, layer].std(0)  # (H,)
        views = [(layer, int(c), "varies most") for c in spread.argsort(descending=True)[:DEFAULT_CELLS]]
    spans = surprise.spans(trace.text, trace.bits)
    summary = {
        **(about or {}),
        "chars": len(trace.text),
        "tokens": len(trace.ids),
        "bits_per_char": _finite(trace.bits_per_char()),
        "show": show,
        "internals": list(trace.names or trace.acts),
        "layers": trace.num_layers,
        "hidden_size": trace.hidden_size,
        "cells_shown": [{"layer": k, "cell": c, "why": why} for k, c, why in views],
        "find": found,
        "gates": gates.saturation(trace.acts, trace.gate_names),
        "surprising_spans": spans,
    }
    summary["gate_summary"] = gates.summary(summary["gates"])
    data = {
        **summary,
        "text": trace.text,
        "views": [_view(trace, show, k, c, why) for k, c, why in views],
        "char_tok": None if trace.identity else trace.char_tok.tolist(),
        "bits": [-1 if math.isnan(b) else int(round(b * 100)) for b in trace.bits.tolist()],
        "top_ids": trace.top_ids.reshape(-1).tolist(),
        "top_p": np.rint(trace.top_p * 1000).astype(np.int64).reshape(-1).tolist(),
        "top_k": trace.top_ids.shape[1],
        "symbols": [_symbol(vocab, i) for i in range(len(vocab))],
    }
    return summary, data


def _view(trace: Trace, show: str, layer: int, cell: int, why: str) -> dict:
    """One cell's activation at every token, as int8 (value / scale * 127) in base64."""
    a = trace.acts[show][:, layer, cell]  # (N,)
    scale = float(a.abs().max()) or 1.0
    q = torch.round(a / scale * 127).clamp(-127, 127).to(torch.int8).numpy()
    return {
        "layer": layer,
        "cell": cell,
        "name": show,
        "why": why,
        "scale": scale,
        "q": base64.b64encode(q.tobytes()).decode("ascii"),
    }


def _extent(target: np.ndarray, binary: bool) -> int:
    """How much of the text the property covers: characters inside (binary) or distinct values (counts)."""
    return int(target.sum()) if binary else int(len(np.unique(target)))


def _finite(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def _symbol(vocab, i: int) -> str:
    """A vocabulary entry as the page shows it: the character, a piece, or a byte (printable ASCII as itself)."""
    if vocab.kind == "bytes":
        b = int(vocab.codes[i])
        return chr(b) if 32 <= b < 127 or b in (9, 10) else f"<0x{b:02X}>"
    return vocab.symbol(i)
