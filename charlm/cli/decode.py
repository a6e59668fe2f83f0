"""Commands that read checkpoints: sample, beam, eval (one model or an ensemble) and info.

Each is: parse the options, call the public API (charlm/api/), print. Nothing heavy is imported
until a command runs, so `charlm --help` and completion never load torch.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, List, Optional

import typer
from typing_extensions import Annotated

from charlm.cli import dynamic as dyn
from charlm.cli.app import app, err, friendly, read_text_file
from charlm.decoding.options import COMBINE_RULES, check_unknown
from charlm.errors import CharlmError, DataError, OptionError
from charlm.jsonsafe import strict_json
from charlm.terminal import argument_text, rule, shown, stdout_is_utf8, undecodable

if TYPE_CHECKING:
    from charlm.api import LanguageModel, Score

DECODE_DTYPES = ("fp32", "bf16", "int8")  # charlm.config.DECODE_DTYPES, named here without importing it (checked in tests)
EVAL_DTYPES = ("fp32", "bf16")

CkptArg = Annotated[List[Path], typer.Argument(help="One checkpoint, or several for an ensemble.", show_default=False)]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Ensemble weights, one per model, e.g. 0.5,0.3,0.2.")]
CombineOpt = Annotated[str, typer.Option(help="Ensemble rule: mean (of probabilities) or geometric (normalized).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="fp32; bf16 matrix products: faster on CPUs with bf16 units (for one stream, and more so for batches and beams), figures differ slightly from fp32; int8 weights (one scale per row, bf16 activations): the least memory read per step, fastest for one stream and for ensembles, figures differ more (the prime still runs in bf16)."
    ),
]
EvalDtypeOpt = Annotated[
    str,
    typer.Option(help="fp32, or bf16 matrix products: faster on CPUs with bf16 units; the figures differ slightly from fp32."),
]
PrimeUnknownOpt = Annotated[
    str, typer.Option(help="Prime characters outside a char vocabulary: error, or skip (the model never sees them).")
]
PrimeFileOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--prime-file",
        metavar="FILE",
        show_default=False,
        help="Read the prime from a UTF-8 file, newlines and all (used exactly as written, final newline included); instead of --prime.",
    ),
]


def load_model(
    paths: list[Path], device: str, dtype: str, weights: Optional[str], combine: str, allowed: tuple[str, ...] = DECODE_DTYPES
) -> LanguageModel:
    """The checkpoints as one LanguageModel, the flags checked first (before any file is read)."""
    import charlm

    if dtype not in allowed:
        hint = " (int8 is for step-by-step decoding: sample and beam)" if dtype == "int8" else ""
        raise OptionError(f"--dtype must be one of {', '.join(allowed)} (got {dtype!r}){hint}")
    if combine not in COMBINE_RULES:
        raise OptionError(f"--combine must be one of {', '.join(COMBINE_RULES)} (got {combine!r})")
    return charlm.load(*paths, device=device, dtype=dtype, weights=parse_weights(weights), combine=combine)


def parse_weights(weights: Optional[str]) -> Optional[list[float]]:
    if weights is None:
        return None
    try:
        return [float(w) for w in weights.split(",")]
    except ValueError:
        raise OptionError(f"--weights expects numbers separated by commas, e.g. 0.5,0.3,0.2 (got {weights!r})") from None


def read_prime(prime: str, prime_file: Optional[Path]) -> str:
    """The prime: --prime, or the whole of --prime-file as UTF-8 (a leading BOM dropped); not both."""
    if prime_file is None:
        return argument_text(prime)  # UTF-8 typed under an ASCII locale is still UTF-8 (charlm.terminal)
    if prime:
        raise OptionError("give either --prime TEXT or --prime-file FILE, not both")
    return read_text_file("--prime-file", prime_file)


def checked_argument(flag: str, value: str) -> str:
    """A text argument as text; bytes in it that are not UTF-8 are an error that names them."""
    value = argument_text(value)
    bad = undecodable(value)
    if bad is not None:
        raise DataError(
            f"{flag} holds the byte 0x{bad[1]:02X} at character {bad[0] + 1}, which is not UTF-8 text; give it as UTF-8"
        )
    return value


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
    greedy: Annotated[
        bool, typer.Option(help="Always take the most likely character (ignores temperature/top-k/top-p).")
    ] = False,
    seed: Annotated[
        Optional[int], typer.Option(help="Seed: the same seed gives the same text (sample i of --num-samples uses seed+i-1).")
    ] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated together as one batch.")] = 1,
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    adapt: Annotated[
        Optional[Path],
        typer.Option(
            metavar="FILE",
            show_default=False,
            help="First adapt to this UTF-8 text (dynamic evaluation over it, in memory), then generate: the model continues in its style.",
        ),
    ] = None,
    dyn_lr: dyn.DynLrOpt = None,
    dyn_decay: dyn.DynDecayOpt = None,
    dyn_update: dyn.DynUpdateOpt = "auto",
    dyn_window: dyn.DynWindowOpt = None,
):
    """Generate text, streaming it to stdout as it is produced."""
    from charlm.decoding.streams import random_seed

    prime = read_prime(prime, prime_file)
    check_sample_flags(unknown, greedy, temperature, top_k, top_p, length, num_samples, seed)
    dyn.check_options(dyn_update, dyn_lr, dyn_decay, dyn_window)
    adapt_text = dyn.read_adapt_text(adapt) if adapt is not None else None
    lm = load_model(checkpoints, device, dtype, weights, combine)
    if adapt_text is not None:
        lm = dyn.adapt(lm, adapt, adapt_text, unknown, (dyn_update, dyn_lr, dyn_decay, dyn_window))
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, unknown=unknown)
    seed = random_seed() >> 8 if seed is None else seed
    if num_samples == 1:
        write_text(
            itertools.chain([prime], lm.stream(prime, length, seed=seed, **settings), ["\n"])
        )  # streamed, not listed first
    else:
        write_samples(lm.stream_many([prime] * num_samples, length, seed=seed, **settings), prime, num_samples)


def check_sample_flags(
    unknown: str,
    greedy: bool,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    length: int,
    num_samples: int,
    seed: Optional[int],
) -> None:
    """sample's own flags, checked before any file is read."""
    from charlm.decoding.sampling import processors

    check_unknown(unknown)
    if not greedy:
        processors(temperature, top_k, top_p)
    if length < 0:
        raise OptionError(f"--length must be >= 0 (got {length})")
    if num_samples < 1:
        raise OptionError(f"--num-samples must be at least 1 (got {num_samples})")
    if seed is not None and not 0 <= seed <= 2**63 - num_samples:
        raise OptionError(f"--seed must be between 0 and 2^63-1 (got {seed})")


def write_text(pieces: Iterable[str]) -> None:
    """Text to stdout as it comes, each piece flushed (the output streams)."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()


def write_samples(pieces: Iterable[tuple[int, str]], prime: str, count: int) -> None:
    """Several samples stepped together: the first printed as it is produced, the others (held in memory) one
    after another when they are done, so a reader that stops early stops the run at once."""
    held = [""] * count
    r = rule()
    err.print(f"{r} sample 1/{count} {r}")
    sys.stdout.write(prime)
    for i, piece in pieces:
        if i == 0:
            write_text([piece])
        else:
            held[i] += piece
    sys.stdout.write("\n")
    for i in range(1, count):
        err.print(f"{r} sample {i + 1}/{count} {r}")
        write_text([prime + held[i] + "\n"])


@app.command()
@friendly
def beam(
    checkpoints: CkptArg,
    prime: Annotated[str, typer.Option(help="Text to continue.")] = "",
    prime_file: PrimeFileOpt = None,
    length: Annotated[
        int, typer.Option(help="Symbols to generate at most: characters, or pieces for a SentencePiece model.")
    ] = 100,
    beam_width: Annotated[int, typer.Option(help="Hypotheses kept at each step (K); 1 is greedy decoding.")] = 5,
    n_best: Annotated[int, typer.Option(help="How many of the best continuations to print (M <= K).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Rank by log-prob / length**A; 0 ranks by the total log-prob.")] = 0.0,
    stop_at: Annotated[
        Optional[str], typer.Option(help="End a hypothesis when it produces this text (e.g. a newline: $'\\n').")
    ] = None,
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
    prime = read_prime(prime, prime_file)
    check_unknown(unknown)
    lm = load_model(checkpoints, device, dtype, weights, combine)
    if stop_at:  # accept a typed "\\n" or "\\t" as well as a real newline or tab
        stop_at = checked_argument("--stop-at", stop_at).replace("\\n", "\n").replace("\\t", "\t")
    results = lm.beam(
        prime, length, beam_width=beam_width, n_best=n_best, length_penalty=length_penalty, stop=stop_at, unknown=unknown
    )
    rows = [
        {"text": prime + b.text, "logprob": b.logprob, "chars": len(b.text), "tokens": b.tokens, "bits_per_char": b.bits_per_char}
        for b in results
    ]  # bits per character of the generated text, whatever the unit
    if as_json:
        print(strict_json(rows, ensure_ascii=not stdout_is_utf8()))
        return
    line = rule()
    for i, r in enumerate(rows):
        err.print(
            f"{line} {i + 1}/{len(rows)}: log-prob {r['logprob']:.3f}, {r['bits_per_char']:.3f} bits/char over {r['chars']} chars {line}"
        )
        sys.stdout.write(r["text"] + "\n")
        sys.stdout.flush()


@app.command("eval")
@friendly
def eval_cmd(
    checkpoints: CkptArg,
    split: Annotated[
        str, typer.Option(help="val, test, train, or several joined with + (val+test = the last 10% by default).")
    ] = "val",
    text: Annotated[Optional[Path], typer.Option(help="Score this UTF-8 file instead of a split.")] = None,
    data: Annotated[
        Optional[Path], typer.Option(help="Prepared dir to read the split from (default: the one recorded in the checkpoint).")
    ] = None,
    unknown: Annotated[
        str,
        typer.Option(
            help="Characters outside a char vocabulary: error, or skip (drops them from the text scored). SentencePiece models score any text."
        ),
    ] = "error",
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object (ensemble figures at the top, members in 'members'; with --dynamic: 'static' and 'dynamic').",
        ),
    ] = False,
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
    check_unknown(unknown)
    if dynamic:
        dyn.check_dtype(dtype)
        dyn.check_options(dyn_update, dyn_lr, dyn_decay, dyn_window)
    lm = load_model(checkpoints, device, dtype, weights, combine, allowed=EVAL_DTYPES)
    raw = read_eval_text(text, lm.vocab.kind) if text is not None else None
    source = shown(text) if text else split
    static = lm.score(raw, split=None if raw is not None else split, data=data, unknown=unknown)
    if dynamic:
        adapting = lm.score(
            raw,
            split=None if raw is not None else split,
            data=data,
            unknown=unknown,
            dynamic=True,
            dyn_lr=dyn_lr,
            dyn_decay=dyn_decay,
            dyn_update=dyn_update,
            dyn_window=dyn_window,
        )
        return dyn.eval_report(checkpoints, static, adapting, source, combine, as_json)
    if as_json:
        payload: dict[str, Any] = {**static.figures(), "source": source}
        if static.members:
            payload["members"] = [{"checkpoint": str(p), **m.figures()} for p, m in zip(checkpoints, static.members)]
            payload["combine"] = combine
        print(strict_json(payload))
        return
    print_eval_table(static, checkpoints, combine, source)


def print_eval_table(static: Score, checkpoints: list[Path], combine: str, source: str) -> None:
    """eval's table: each member's figures (an ensemble), then the model's; bits per token where tokens are not characters."""
    from rich.table import Table
    from rich.text import Text

    from charlm.terminal import PipeConsole

    per_token = static.tokens != static.chars
    columns = ["model", "bits/char", "perplexity", "chars"] + (["bits/token", "tokens"] if per_token else [])
    table = Table(*columns, title=f"charlm eval on {source}")
    name = f"ensemble ({combine}, {len(static.members)} models)" if static.members else shown(checkpoints[0])
    for label, r in [(shown(p), m) for p, m in zip(checkpoints, static.members)] + [(name, static)]:
        cells = [Text(label), f"{r.bits_per_char:.4f}", f"{r.perplexity:.3f}", f"{r.chars:,}"]
        table.add_row(*cells, *([f"{r.bits_per_token:.4f}", f"{r.tokens:,}"] if per_token else []))
    PipeConsole().print(table)


def read_eval_text(path: Path, vocab_kind: str) -> str | bytes:
    """--text FILE: its bytes for a byte vocabulary (scored as they are), else its text as UTF-8."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CharlmError(f"{shown(path)} does not exist") from None
    except IsADirectoryError:
        raise CharlmError(f"--text {shown(path)} is a directory; give a text file") from None
    if vocab_kind == "bytes":
        return raw
    try:
        text = raw.decode("utf-8-sig")  # a leading BOM is not text: prepare drops it too
    except UnicodeDecodeError as e:
        raise CharlmError(f"{shown(path)} is not valid UTF-8 (byte offset {e.start})") from None
    if not text:
        raise CharlmError(f"{shown(path)} is empty")
    return text
