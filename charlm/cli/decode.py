"""Commands that read checkpoints: sample, beam, eval (one model or an ensemble) and info."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typing_extensions import Annotated

from charlm import checkpoint, config
from charlm.errors import CharlmError
from charlm.cli import dynamic as dyn
from charlm.cli.app import app, err, friendly, read_text_file
from charlm.data import PreparedData
from charlm.decoding.beam import beam_search
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.evaluate import bits_per_char, evaluate, scored_chars
from charlm.decoding.sampling import processors
from charlm.decoding.sampling import sample as sample_ids
from charlm.decoding.scorer import ModelScorer
from charlm.devices import check_dtype, pick_device
from charlm.jsonsafe import finite_or_null


def _load_scorers(paths: list[Path], device: str, dtype: str, allowed: tuple[str, ...] = config.DECODE_DTYPES,
                  adapt: bool = False) -> list[ModelScorer]:
    if dtype not in allowed:
        hint = " (int8 is for step-by-step decoding: sample and beam)" if dtype == "int8" else ""
        raise CharlmError(f"--dtype must be one of {', '.join(allowed)} (got {dtype!r}){hint}")
    if device not in config.DEVICES:
        raise CharlmError(f"--device must be one of {', '.join(config.DEVICES)} (got {device!r})")
    dev = pick_device(device)
    check_dtype(dev, dtype)
    scorers = []
    for p in paths:
        ckpt = checkpoint.load(p)
        scorers.append(ModelScorer(ckpt.build_model().to(dev), ckpt.vocab, dtype=dtype))
        if adapt:  # dynamic evaluation: the training window and gradient statistics (charlm/decoding/dynamic.py)
            scorers[-1].adapt_source = dyn.dynamic.adapt_source(ckpt)
    return scorers


def _parse_weights(weights: Optional[str]) -> Optional[list[float]]:
    if weights is None:
        return None
    try:
        return [float(w) for w in weights.split(",")]
    except ValueError:
        raise CharlmError(f"--weights expects numbers separated by commas, e.g. 0.5,0.3,0.2 (got {weights!r})") from None


def _scorer(paths: list[Path], device: str, weights: Optional[str], combine: str, dtype: str = "fp32",
            allowed: tuple[str, ...] = config.DECODE_DTYPES, adapt: bool = False):
    members = _load_scorers(paths, device, dtype, allowed, adapt)
    if len(members) == 1 and weights is None:
        return members[0], members
    return Ensemble(members, _parse_weights(weights), combine), members


CkptArg = Annotated[List[Path], typer.Argument(help="One checkpoint, or several for an ensemble.", show_default=False)]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Ensemble weights, one per model, e.g. 0.5,0.3,0.2.")]
CombineOpt = Annotated[str, typer.Option(help="Ensemble rule: mean (of probabilities) or geometric (normalized).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="fp32; bf16 matrix products: faster on CPUs with bf16 units (for one stream, and more so for batches and beams), figures differ slightly from fp32; int8 weights (one scale per row, bf16 activations): the least memory read per step, fastest for one stream and for ensembles, figures differ more (the prime still runs in bf16).")]
EvalDtypeOpt = Annotated[str, typer.Option(help="fp32, or bf16 matrix products: faster on CPUs with bf16 units; the figures differ slightly from fp32.")]
PrimeUnknownOpt = Annotated[str, typer.Option(help="Prime characters outside a char vocabulary: error, or skip (the model never sees them).")]
PrimeFileOpt = Annotated[Optional[Path], typer.Option("--prime-file", metavar="FILE", show_default=False, help="Read the prime from a UTF-8 file, newlines and all (used exactly as written, final newline included); instead of --prime.")]


def _read_prime(prime: str, prime_file: Optional[Path]) -> str:
    """The prime: --prime, or the whole of --prime-file as UTF-8 (a leading BOM dropped); not both."""
    if prime_file is None:
        return prime
    if prime:
        raise CharlmError("give either --prime TEXT or --prime-file FILE, not both")
    return read_text_file("--prime-file", prime_file)


@app.command()
@friendly
def sample(
    checkpoints: CkptArg,
    length: Annotated[int, typer.Option(help="Symbols to generate: characters, or pieces for a SentencePiece model.")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from (run through the network first, then printed).")] = "",
    prime_file: PrimeFileOpt = None,
    unknown: PrimeUnknownOpt = "error",
    temperature: Annotated[float, typer.Option(help="> 0; below 1 is more conservative.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample only among the k most likely characters.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sample only within the top probability mass p.")] = None,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely character (ignores temperature/top-k/top-p).")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed: the same seed gives the same text.")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated together as one batch.")] = 1,
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    adapt: Annotated[Optional[Path], typer.Option(metavar="FILE", show_default=False, help="First adapt to this UTF-8 text (dynamic evaluation over it, in memory), then generate: the model continues in its style.")] = None,
    dyn_lr: dyn.DynLrOpt = None,
    dyn_decay: dyn.DynDecayOpt = None,
    dyn_update: dyn.DynUpdateOpt = "auto",
    dyn_window: dyn.DynWindowOpt = None,
):
    """Generate text, streaming it to stdout as it is produced."""
    prime = _read_prime(prime, prime_file)
    chain = processors(temperature, top_k, top_p)
    dyn.dynamic.check_options(dyn_update, dyn_lr, dyn_decay, dyn_window)
    scorer, members = _scorer(checkpoints, device, weights, combine, dtype, adapt=adapt is not None)
    vocab = scorer.vocab
    prime_t = _prime_ids(vocab, prime, unknown)
    if adapt is not None:
        dyn.adapt(adapt, checkpoints, scorer, members, unknown, (dyn_update, dyn_lr, dyn_decay, dyn_window))
    if seed is not None and not 0 <= seed < 2**63:
        raise CharlmError(f"--seed must be between 0 and 2^63-1 (got {seed})")
    generator = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    out = sys.stdout
    if num_samples == 1:
        decode = vocab.stream_decoder()
        out.write(prime)

        def emit(ids):
            out.write(decode(int(ids[0])))
            out.flush()

        sample_ids(scorer, prime_t, length, chain, greedy, generator, 1, on_step=emit)
        out.write("\n")
    else:
        ids = sample_ids(scorer, prime_t, length, chain, greedy, generator, num_samples)
        for i, row in enumerate(ids.tolist()):
            err.print(f"── sample {i + 1}/{num_samples} ──")
            out.write(prime + vocab.decode(row) + "\n")
            out.flush()


def _check_unknown(unknown: str) -> None:
    if unknown not in ("error", "skip"):
        raise CharlmError(f"--unknown must be error or skip (got {unknown!r})")


def _prime_ids(vocab, prime: str, unknown: str = "error") -> torch.Tensor:
    """The prime as ids; with no prime (or none left), start as if after a line break (or from the first symbol)."""
    _check_unknown(unknown)
    ids = vocab.encode(prime, unknown) if prime else np.zeros(0, dtype=np.int64)
    if len(ids) == 0:
        ids = vocab.encode("\n", unknown="skip")[:1] if vocab.kind in ("char", "spm") else np.zeros(0, dtype=np.int64)
        if len(ids) == 0:
            ids = np.zeros(1, dtype=np.int64)
    return torch.from_numpy(np.asarray(ids, dtype=np.int64))


@app.command()
@friendly
def beam(
    checkpoints: CkptArg,
    prime: Annotated[str, typer.Option(help="Text to continue.")] = "",
    prime_file: PrimeFileOpt = None,
    length: Annotated[int, typer.Option(help="Symbols to generate at most: characters, or pieces for a SentencePiece model.")] = 100,
    beam_width: Annotated[int, typer.Option(help="Hypotheses kept at each step (K); 1 is greedy decoding.")] = 5,
    n_best: Annotated[int, typer.Option(help="How many of the best continuations to print (M <= K).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Rank by log-prob / length**A; 0 ranks by the total log-prob.")] = 0.0,
    stop_at: Annotated[Optional[str], typer.Option(help="End a hypothesis when it produces this text (e.g. a newline: $'\\n').")] = None,
    unknown: PrimeUnknownOpt = "error",
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {text, logprob, bits_per_char}.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Beam search for the most likely continuation(s).

    Deterministic: temperature, top-k and top-p apply to `charlm sample`, not to beam search.
    """
    prime = _read_prime(prime, prime_file)
    scorer, _ = _scorer(checkpoints, device, weights, combine, dtype)
    vocab = scorer.vocab
    if stop_at:  # accept a typed "\\n" or "\\t" as well as a real newline or tab
        stop_at = stop_at.replace("\\n", "\n").replace("\\t", "\t")
    stop = torch.from_numpy(np.asarray(vocab.encode(stop_at), dtype=np.int64)) if stop_at else None
    results = beam_search(scorer, _prime_ids(vocab, prime, unknown), length, beam_width, n_best, length_penalty, stop)
    rows = []
    for ids, logprob in results:
        new = vocab.decode(ids)  # bits per character of the generated text, whatever the unit
        rows.append({"text": prime + new, "logprob": logprob, "chars": len(new), "tokens": len(ids),
                     "bits_per_char": bits_per_char(-logprob, max(len(new), 1))})
    if as_json:
        print(_json(rows, ensure_ascii=False))
        return
    for i, r in enumerate(rows):
        err.print(f"── {i + 1}/{len(rows)}: log-prob {r['logprob']:.3f}, {r['bits_per_char']:.3f} bits/char over {r['chars']} chars ──")
        sys.stdout.write(r["text"] + "\n")
        sys.stdout.flush()


def _eval_tokens(ckpt_path: Path, vocab, split: str, text: Optional[Path], data_dir: Optional[Path], unknown: str):
    """The token stream to score and the number of characters of the text it spells."""
    if text is not None:
        try:
            raw = text.read_bytes()
        except FileNotFoundError:
            raise CharlmError(f"{text} does not exist") from None
        if vocab.kind == "bytes":
            ids = vocab.encode_units(np.frombuffer(raw, dtype=np.uint8).astype(np.uint32), unknown)
            return ids, len(ids)
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CharlmError(f"{text} is not valid UTF-8 (byte offset {e.start})") from None
        if not s:
            raise CharlmError(f"{text} is empty")
        ids = vocab.encode(s, unknown)
        # With --unknown skip (char vocabularies), the figure covers the kept characters only.
        return ids, len(s) if vocab.kind == "spm" else len(ids)
    meta = checkpoint.read_meta(ckpt_path)  # the scorer holds the weights already: only the recorded data dir is needed
    recorded = (meta.get("provenance") or {}).get("data_dir")
    if data_dir is None and not isinstance(recorded, str):
        raise CharlmError(f"{ckpt_path} does not record the data it was trained on; give it with --data DIR, or score a file with --text")
    data = PreparedData(data_dir or recorded)
    if data.vocab != vocab:
        raise CharlmError(f"{data.dir} has a different vocabulary than {ckpt_path}")
    parts = split.split("+")
    tokens = np.concatenate([np.asarray(data.tokens(s)) for s in parts])
    return tokens, sum(data.chars(s) for s in parts)


@app.command("eval")
@friendly
def eval_cmd(
    checkpoints: CkptArg,
    split: Annotated[str, typer.Option(help="val, test, train, or several joined with + (val+test = the last 10% by default).")] = "val",
    text: Annotated[Optional[Path], typer.Option(help="Score this UTF-8 file instead of a split.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared dir to read the split from (default: the one recorded in the checkpoint).")] = None,
    unknown: Annotated[str, typer.Option(help="Characters outside a char vocabulary: error, or skip (drops them from the text scored). SentencePiece models score any text.")] = "error",
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (ensemble figures at the top, members in 'members'; with --dynamic: 'static' and 'dynamic').")] = False,
    device: DeviceOpt = "cpu",
    dtype: EvalDtypeOpt = "fp32",
    dynamic: dyn.DynamicOpt = False,
    dyn_lr: dyn.DynLrOpt = None,
    dyn_decay: dyn.DynDecayOpt = None,
    dyn_update: dyn.DynUpdateOpt = "auto",
    dyn_window: dyn.DynWindowOpt = None,
):
    """Bits per character and perplexity, the text scored as one stream with the state carried through.

    Always per character of the text, whatever the model's unit; a SentencePiece model also gets bits per token.
    """
    _check_unknown(unknown)
    if dynamic:
        dyn.check_dtype(dtype)
        dyn.dynamic.check_options(dyn_update, dyn_lr, dyn_decay, dyn_window)
    scorer, members = _scorer(checkpoints, device, weights, combine, dtype, allowed=config.DTYPES, adapt=dynamic)
    tokens, text_chars = _eval_tokens(checkpoints[0], scorer.vocab, split, text, data, unknown)
    if len(tokens) < 2:
        raise CharlmError("the text to score has fewer than 2 characters")
    chars = scored_chars(scorer.vocab, tokens, text_chars)
    if chars < 1:
        raise CharlmError("the text to score spells no character after its first token: nothing to score")
    if dynamic:
        return dyn.eval_report(checkpoints, scorer, members, tokens, chars, str(text) if text else split, combine, as_json,
                               (dyn_update, dyn_lr, dyn_decay, dyn_window))
    result = _per_char(evaluate(scorer, tokens, chars=chars))
    rows = []
    if len(members) > 1:
        rows = [{"checkpoint": str(p), **_per_char(evaluate(m, tokens, chars=chars))} for p, m in zip(checkpoints, members)]
    for r in rows + [result]:
        if not math.isfinite(r["bits_per_char"]):
            raise CharlmError(f"{r.get('checkpoint', 'the model')} gives a non-finite figure ({r['bits_per_char']} bits/char): "
                              "its weights overflow float32 on this text")
    source = str(text) if text else split
    if as_json:
        payload = {**result, "source": source}
        if rows:
            payload["members"] = rows
            payload["combine"] = combine
        print(_json(payload))
        return
    per_token = "bits_per_token" in result
    columns = ["model", "bits/char", "perplexity", "chars"] + (["bits/token", "tokens"] if per_token else [])
    table = Table(*columns, title=f"charlm eval on {source}")
    name = f"ensemble ({combine}, {len(members)} models)" if rows else str(checkpoints[0])
    for label, r in [(r["checkpoint"], r) for r in rows] + [(name, result)]:
        cells = [Text(label), f"{r['bits_per_char']:.4f}", f"{r['perplexity']:.3f}", f"{r['chars']:,}"]
        table.add_row(*cells, *([f"{r['bits_per_token']:.4f}", f"{r['tokens']:,}"] if per_token else []))
    Console().print(table)


def _per_char(result: dict) -> dict:
    """An evaluation record, with bits per token only where tokens are not characters."""
    if result["tokens"] == result["chars"]:
        result = {k: v for k, v in result.items() if k != "bits_per_token"}
    return result


def _json(payload, **kwargs) -> str:
    """Strict JSON (no NaN or Infinity, which JSON has no words for); a figure that is not finite is an error."""
    try:
        return json.dumps(payload, allow_nan=False, **kwargs)
    except ValueError:
        raise CharlmError("a figure is not a finite number (NaN or infinite): the model's outputs overflow") from None


def _literal(text: str, limit: int = 500) -> Text:
    """Text from a file, shown as it is: never rich markup, control characters (ANSI escapes) made visible."""
    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text[:limit])
    return Text(text)


@app.command()
@friendly
def info(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON (a figure that does not exist, such as the validation figure of a run without a validation split, is null).")] = False,
):
    """Show what a checkpoint holds: model, vocabulary, training config, metrics, provenance."""
    c = checkpoint.load(ckpt)
    if as_json:
        print(json.dumps(finite_or_null(c.meta), indent=1, ensure_ascii=False, allow_nan=False))
        return
    table = Table("field", "value", title=_literal(str(ckpt)), show_lines=False)  # file contents are never rich markup
    table.add_row("format", f"{checkpoint.FORMAT} v{checkpoint.VERSION}")
    checks = {"verified": "verified (sha256 of the weights, and of the metadata and training state)",
              "none": "none (written before checksums; unchecked)"}
    table.add_row("weights checksum", checks[c.checksum])
    vocab = c.vocab
    if vocab.kind == "spm":
        table.add_row("vocabulary", _literal(vocab.describe()[0].upper() + vocab.describe()[1:]))
    else:
        table.add_row("vocabulary", _literal(f"{len(vocab)} {vocab.kind} symbols: {''.join(vocab.symbol(i) for i in range(min(len(vocab), 100)))!r}"))
    for section in ("model", "metrics", "provenance", "train"):
        for k, v in c.meta.get(section, {}).items():
            if isinstance(v, float):
                v = f"{v:.4f}" if math.isfinite(v) else str(v)
            table.add_row(_literal(f"{section}.{k}"), _literal(str(v)))
    table.add_row("training state", "yes (resumable)" if c.has_train_state else "no (weights only)")
    table.add_row("tensors", f"{len(c.tensors)} ({sum(t.numel() for t in c.model_state().values()):,} model parameters)")
    Console().print(table)
