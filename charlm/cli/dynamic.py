"""Dynamic evaluation on the command line: `eval --dynamic` and `sample --adapt FILE` (charlm/decoding/dynamic.py)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typing_extensions import Annotated

from charlm.errors import CharlmError
from charlm.cli.app import err, read_text_file
from charlm.decoding import dynamic
from charlm.decoding.evaluate import evaluate

DynamicOpt = Annotated[bool, typer.Option("--dynamic", help="Also score with dynamic evaluation: after each window is scored the model takes a gradient step on it (a copy in memory; the checkpoint is never written). Static and dynamic figures side by side.")]
DynLrOpt = Annotated[Optional[float], typer.Option(help=f"Dynamic evaluation's learning rate (default: {dynamic.DEFAULTS['rms'][0]} for the RMS-normalised update, {dynamic.DEFAULTS['sgd'][0]} for SGD; 0 = static).", show_default=False)]
DynDecayOpt = Annotated[Optional[float], typer.Option(help=f"Pull back toward the trained weights per window, in [0, 1] (default: {dynamic.DEFAULTS['rms'][1]} RMS, {dynamic.DEFAULTS['sgd'][1]} SGD).", show_default=False)]
DynUpdateOpt = Annotated[str, typer.Option(help="auto: RMS-normalised with the training gradient statistics when the checkpoint holds them (last.safetensors), else plain SGD; rms; sgd.")]
DynWindowOpt = Annotated[Optional[int], typer.Option(help="Characters (tokens) per adaptation step (default: the checkpoint's training window).", show_default=False)]


def check_dtype(dtype: str) -> None:
    if dtype != "fp32":
        raise CharlmError(f"dynamic evaluation runs in fp32 (it takes gradient steps); leave out --dtype {dtype}")


def adapters_for(checkpoints: list[Path], members, update: str, lr, decay, window) -> tuple[list, dynamic.Settings, Optional[str]]:
    """An Adapter per member (its own copy: the scorer's model, loaded from the file), and the settings used."""
    sources = [m.adapt_source for m in members]
    settings, note = dynamic.resolve(sources, [str(p) for p in checkpoints], update, lr, decay, window)
    return [dynamic.Adapter(m.model, settings, s.mean_sq) for m, s in zip(members, sources)], settings, note


def _combine(scorer):
    return getattr(scorer, "_combine", None)


def eval_report(checkpoints: list[Path], scorer, members, tokens: np.ndarray, chars: int, source: str, combine: str,
                as_json: bool, options: tuple) -> None:
    """Static figures first (the weights as trained), then dynamic ones (the same weights, adapting), side by side."""
    from charlm.cli.decode import _json, _per_char

    adapters, settings, note = adapters_for(checkpoints, members, *options)
    static = [_timed(m, tokens, chars) for m in members] if len(members) > 1 else []
    static_all = _timed(scorer, tokens, chars)
    dyn_all, dyn_members = dynamic.dynamic_evaluate(adapters, tokens, chars, _combine(scorer))
    for label, r in [("the model", static_all), ("the model, adapting", dyn_all)] + [(str(p), r) for p, r in zip(checkpoints, static + dyn_members)]:
        if not math.isfinite(r["bits_per_char"]):
            raise CharlmError(f"{label} gives a non-finite figure ({r['bits_per_char']} bits/char); with dynamic evaluation, try a lower --dyn-lr")
    if note:
        err.print(f"note: {note}", soft_wrap=True, markup=False, highlight=False)
    described = {"update": settings.update, "lr": settings.lr, "decay": settings.decay, "window": settings.window, "note": note}
    if as_json:
        payload = {"source": source, "static": _per_char(static_all), "dynamic": {**_per_char(dyn_all), **described}}
        if static:
            payload["members"] = [{"checkpoint": str(p), "static": _per_char(s), "dynamic": _per_char(d)}
                                  for p, s, d in zip(checkpoints, static, dyn_members)]
            payload["combine"] = combine
        print(_json(payload))
        return
    rule = "RMS-normalised" if settings.update == "rms" else "SGD"
    table = Table("model", "static bits/char", "dynamic bits/char", "change", "chars", "static chars/s", "dynamic chars/s",
                  title=f"charlm eval on {source}: static and dynamic ({rule}, lr {settings.lr:g}, decay {settings.decay:g}, window {settings.window})")
    name = f"ensemble ({combine}, {len(members)} models)" if static else str(checkpoints[0])
    rows = [(str(p), s, d) for p, s, d in zip(checkpoints, static, dyn_members)] + [(name, static_all, dyn_all)]
    for label, s, d in rows:
        table.add_row(Text(label), f"{s['bits_per_char']:.4f}", f"{d['bits_per_char']:.4f}", f"{d['bits_per_char'] - s['bits_per_char']:+.4f}",
                      f"{s['chars']:,}", f"{s['chars_per_s']:,.0f}", f"{d['chars_per_s']:,.0f}")
    Console().print(table)


def _timed(scorer, tokens: np.ndarray, chars: int) -> dict:
    start = time.perf_counter()
    result = evaluate(scorer, tokens, chars=chars)
    return {**result, "chars_per_s": result["chars"] / max(time.perf_counter() - start, 1e-9)}


def read_adapt_text(path: Path) -> str:
    """--adapt FILE: the whole file as UTF-8 text (a leading BOM dropped)."""
    text = read_text_file("--adapt", path, convert_hint=False)
    if not text:
        raise CharlmError(f"--adapt {path} is empty: nothing to adapt to")
    return text


def adapt(path: Path, checkpoints: list[Path], scorer, members, unknown: str, options: tuple) -> None:
    """sample --adapt FILE: dynamic evaluation over the file, leaving every member's weights adapted to it."""
    text = read_adapt_text(path)
    tokens = np.asarray(scorer.vocab.encode(text, unknown), dtype=np.int64)
    if len(tokens) < 2:
        raise CharlmError(f"--adapt {path} has fewer than 2 symbols the model knows: nothing to adapt to")
    adapters, settings, note = adapters_for(checkpoints, members, *options)
    result, _ = dynamic.dynamic_evaluate(adapters, tokens, combine=_combine(scorer))
    rule = "RMS-normalised" if settings.update == "rms" else ("plain SGD, " + note if note else "SGD")
    err.print(f"adapted to {path}: {len(tokens):,} tokens, {result['bits_per_token']:.4f} bits/token while reading it "
              f"({rule}; lr {settings.lr:g}, decay {settings.decay:g}, window {settings.window})",
              soft_wrap=True, markup=False, highlight=False)
