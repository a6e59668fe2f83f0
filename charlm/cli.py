"""The charlm command line. Thin commands: parse options, call the library, print.

This is the only module that prints to the terminal or exits. Library code raises CharlmError;
here it becomes one red line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import List, NoReturn, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text
from typing_extensions import Annotated

from charlm import CharlmError, checkpoint, config, corpus, distributed
from charlm import prepare as prep
from charlm.data import PreparedData
from charlm.decode import beam_search, processors, sample as sample_ids
from charlm.display import TrainDisplay
from charlm.ensemble import Ensemble
from charlm.evaluate import evaluate, scored_chars
from charlm.scorer import ModelScorer
from charlm.spm import KINDS as TOKENIZER_KINDS
from charlm.spm import TokenizerSpec
from charlm.train import Trainer, TrainingStopped, pick_device

app = typer.Typer(
    help="Character-level recurrent language models: prepare, train, sample, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
corpus_app = typer.Typer(help="Registered corpora: list them, fetch them (checksummed).", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")

err = Console(stderr=True)

# Typer's usage-error class, found through a public name: typer has both depended on click and vendored it.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def fail(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    raise typer.Exit(1)


def friendly(fn):
    """Turn CharlmError (and a second Ctrl-C) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CharlmError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")
        except OSError as e:
            fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))

    return wrapper


def _bytes_progress(description: str) -> Progress:
    return Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


# -- corpus ---------------------------------------------------------------------------------
@corpus_app.command("list")
@friendly
def corpus_list():
    """List the registered corpora and whether each is present locally."""
    table = Table("name", "size", "present", "get from", "description", "license")
    for entry in corpus.registry().values():
        d = corpus.describe(entry)
        table.add_row(d["name"], f"{d['bytes']:,} B", "yes" if d["present"] else "no", d["get"], d["description"], d["license"])
    Console().print(table)


@corpus_app.command("get")
@friendly
def corpus_get(
    name: Annotated[str, typer.Argument(help="A registered corpus name (see: charlm corpus list).")],
    mirror: Annotated[Optional[Path], typer.Option(help=f"Local mirror dir with NAME/input.txt; default ${corpus.MIRROR_ENV}.")] = None,
    source: Annotated[Optional[Path], typer.Option("--from", help="Build it from a kernel source tree or tarball (.tar.xz/.tar.gz/.tar), read as a stream.")] = None,
    subset: Annotated[Optional[str], typer.Option(help="With --from: only these paths of the tree, e.g. kernel,mm (default: the corpus's own).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="With --from: write here instead of corpora/NAME/input.txt (needed for a custom --subset).")] = None,
):
    """Fetch a corpus into corpora/NAME/input.txt from a mirror or its URL (or build it --from a tree), verifying its sha256."""
    if source is None and (subset is not None or out is not None):
        raise CharlmError("--subset and --out go with --from PATH (building from a source tree)")
    if source is not None and mirror is not None:
        raise CharlmError("give either --from PATH (build) or --mirror DIR (copy), not both")
    with _bytes_progress("{task.description}") as bar:
        task = bar.add_task(f"get {name}", total=None)
        if source is None:
            got = corpus.fetch(name, mirror=mirror, progress=lambda done, total: bar.update(task, completed=done, total=total))
        else:
            update = lambda phase, done, total: bar.update(task, description=f"{name}: {phase}", completed=done, total=total)  # noqa: E731
            got = corpus.build(name, source, subset=subset, out=out, progress=update)
    err.print(_corpus_report(name, got), soft_wrap=True)


def _corpus_report(name: str, got: corpus.Fetched) -> str:
    made = f" built from {got.origin}: {got.files:,} files, {got.bytes:,} bytes" if got.files is not None else ""
    if got.origin == "already present":
        made = " (already present)"
    if got.verified:
        return f"{name}: {got.path}{made} (sha256 verified)"
    if not got.registered:
        return f"{got.path}{made}, sha256 {got.sha256} (a custom --subset: no registered checksum to compare)"
    expected = corpus.lookup(name).bytes
    size = "matches" if got.bytes == expected else "DIFFERS from"
    sha = f"sha256 {got.sha256}, which" if got.sha256 else "its sha256"
    return (f"{name}: {got.path}{made}; {sha} could not be verified: the registry has no published sha256 "
            f"for {name}. Its size {size} the registered {expected:,} bytes")


# -- prepare --------------------------------------------------------------------------------
def _split(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise CharlmError(f"--split expects three fractions like 0.9,0.05,0.05 (got {value!r})") from None
    return prep.check_fractions(parts)


class _PrepareBar:
    """A progress bar for the two passes of prepare, shown for inputs over 32 MB."""

    def __init__(self, total: int):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            console=err, transient=True, disable=total < (32 << 20) or not err.is_terminal)
        self.tasks: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=done)


def _run_prepare(files, out, encoding, fractions, tokenizer=None):
    total = sum(f.stat().st_size for f in files)
    bar = _PrepareBar(total)
    with bar.bar:
        return prep.prepare(files, out, encoding=encoding, fractions=fractions, progress=bar, tokenizer=tokenizer)


def _tokenizer_spec(tokenizer: Optional[str], vocab_size: Optional[int], coverage: Optional[float]) -> Optional[TokenizerSpec]:
    """The --tokenizer options as a spec; None when none was given (a prepared dir keeps its own)."""
    if tokenizer is None and vocab_size is None and coverage is None:
        return None
    return TokenizerSpec(tokenizer or "char", vocab_size, 0.9995 if coverage is None else coverage).checked()


TokenizerOpt = Annotated[Optional[str], typer.Option(
    help=f"{', '.join(TOKENIZER_KINDS)}: one id per character (default), or a SentencePiece model trained on the training "
         "split (spm-char: characters with byte fallback; bpe, unigram: subwords). Figures stay in bits per character.",
    show_default=False)]
VocabSizeOpt = Annotated[Optional[int], typer.Option("--vocab-size", help="SentencePiece pieces besides the 256 byte pieces (default: 1024 for bpe and unigram; spm-char: as many as the coverage keeps).", show_default=False)]
CoverageOpt = Annotated[Optional[float], typer.Option(help="SentencePiece: share of the training characters that get a piece of their own; rarer ones are spelled in bytes (default: 0.9995).", show_default=False)]


@app.command()
@friendly
def prepare(
    input: Annotated[str, typer.Argument(help="A text file, a directory (see --glob) or a registered corpus name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dir for meta.json and train/val/test.bin.")],
    glob: Annotated[Optional[str], typer.Option(help="For a directory: files to include, e.g. '**/*.[ch]' (sorted by path).")] = None,
    encoding: Annotated[str, typer.Option(help="utf-8 (characters), or bytes (a byte-level vocabulary for non-UTF-8 files).")] = "utf-8",
    split: Annotated[str, typer.Option(help="train,val,test fractions of the text, in order.")] = "0.9,0.05,0.05",
    mirror: Annotated[Optional[Path], typer.Option(help="Corpus mirror dir, for corpus names.")] = None,
    tokenizer: TokenizerOpt = None,
    vocab_size: VocabSizeOpt = None,
    character_coverage: CoverageOpt = None,
):
    """Encode a text into token ids for training: DIR/meta.json plus train.bin, val.bin, test.bin."""
    spec = _tokenizer_spec(tokenizer, vocab_size, character_coverage)
    files = prep.resolve_inputs(input, glob=glob, mirror=mirror)
    meta = _run_prepare(files, out, encoding, _split(split), spec)
    s = meta["splits"]
    kind, size = meta["tokenizer"]["kind"], meta["vocab_size"]
    pieces = "" if kind in ("char", "bytes") else f" ({kind}: {size - 256} pieces + 256 bytes)"
    err.print(
        f"prepared {meta['source']['chars']:,} characters from {len(files)} file(s) in {meta['seconds']:.1f}s: "
        f"vocabulary {size}{pieces}, train {s['train']['tokens']:,} / "
        f"val {s['val']['tokens']:,} / test {s['test']['tokens']:,} tokens -> {out}", soft_wrap=True)


# -- train ----------------------------------------------------------------------------------
def _run_name(input: str) -> str:
    p = Path(input)
    stem = p.parent.name if p.name == "input.txt" else (p.name if p.is_dir() else p.stem)
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@app.command()
@friendly
def train(
    ctx: typer.Context,
    input: Annotated[Optional[str], typer.Argument(help="A text file, a prepared dir or a corpus name. With --resume: optional.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run dir for checkpoints and metrics.jsonl (default: checkpoints/RUN).")] = None,
    preset: Annotated[Optional[str], typer.Option(help=f"A shipped preset: {', '.join(config.list_presets())}.")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="A YAML file of option: value (explicit flags win).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue exactly from a last.safetensors (optimizer, step, data position, state).")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from a checkpoint's weights only (fresh optimizer and schedule).")] = None,
    cell: Annotated[Optional[str], typer.Option(help="lstm, gru or rnn.", show_default=False)] = None,
    num_layers: Annotated[Optional[int], typer.Option(help="Recurrent layers (default: 2).", show_default=False)] = None,
    rnn_size: Annotated[Optional[int], typer.Option(help="Hidden units per layer (default: 256).", show_default=False)] = None,
    embed_size: Annotated[Optional[int], typer.Option(help="Embedding width (default: 64).", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout between layers and before the head (default: 0).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Contiguous streams B (default: 64).", show_default=False)] = None,
    seq_length: Annotated[Optional[int], typer.Option(help="Window length T: steps of backprop (default: 100).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate, AdamW (default: 0.002).", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (default: 0).", show_default=False)] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the global gradient norm; 0 disables (default: 5).", show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option(help="constant, step or cosine (default: constant).", show_default=False)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps (default: 0).", show_default=False)] = None,
    lr_decay: Annotated[Optional[float], typer.Option(help="step schedule: factor (default: 0.5).", show_default=False)] = None,
    decay_every: Annotated[Optional[int], typer.Option(help="step schedule: every this many steps (default: 1000).", show_default=False)] = None,
    min_lr_ratio: Annotated[Optional[float], typer.Option(help="cosine schedule: final lr / lr (default: 0.1).", show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.", show_default=False)] = None,
    max_epochs: Annotated[Optional[float], typer.Option(help="Stop after this many passes over the training split.", show_default=False)] = None,
    time_budget: Annotated[Optional[str], typer.Option(help="Stop after this long: 90s, 10m, 1h. No limit at all: one epoch.", show_default=False)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Validate and checkpoint every N steps (default: 200).", show_default=False)] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Report progress every N steps (default: 10).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialisation and dropout (default: 1337).", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or mps (default: auto).", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, or bf16 autocast with fp32 master weights (default: fp32).", show_default=False)] = None,
    encoding: Annotated[str, typer.Option(help="For a text input: utf-8 or bytes.")] = "utf-8",
    split: Annotated[str, typer.Option(help="For a text input: train,val,test fractions.")] = "0.9,0.05,0.05",
    tokenizer: TokenizerOpt = None,
    spm_vocab_size: VocabSizeOpt = None,
    character_coverage: CoverageOpt = None,
    glob: Annotated[Optional[str], typer.Option(help="For a directory input: files to include.")] = None,
    mirror: Annotated[Optional[Path], typer.Option(help="Corpus mirror dir, for corpus names.")] = None,
    nproc: Annotated[Optional[int], typer.Option(help="Data-parallel on N processes of this machine (runs torchrun for you); --batch-size is per process.", show_default=False)] = None,
    backend: Annotated[str, typer.Option(help="With several processes: auto (NCCL on CUDA, Gloo on CPU), nccl or gloo.")] = "auto",
):
    """Train a character-level RNN with truncated backpropagation through time.

    Data-parallel: `charlm train --nproc N ...`, or `torchrun --nproc-per-node N -m charlm train ...`.
    """
    explicit = {k: v for k, v in locals().items() if k in config.all_keys()}
    layers = []
    if preset:
        layers.append(config.load_preset(preset))
    if config_file:
        layers.append(config.load_config_file(config_file))
    layers.append(explicit)

    resumed = checkpoint.load(resume) if resume else None
    init = checkpoint.load(init_from) if init_from else None
    if resumed is not None:
        model_flags = {k for layer in layers for k, v in layer.items() if v is not None and k in config.field_names(config.ModelConfig)}
        if model_flags:
            raise CharlmError(f"--resume keeps the checkpoint's model; drop {', '.join(sorted(model_flags))} (or use --init-from)")
        model_cfg, train_cfg = config.resolve(*layers, base={"model": resumed.meta["model"], "train": resumed.meta["train"]})
        input = input or resumed.meta["provenance"]["data_dir"]
        out = out or resumed.path.parent
    else:
        if input is None:
            raise CharlmError("give a text file, prepared dir or corpus name to train on (or --resume CKPT)")
        base = {"model": init.meta["model"]} if init is not None else None
        model_cfg, train_cfg = config.resolve(*layers, base=base)
        out = out or Path("checkpoints") / _run_name(input)

    spec = _tokenizer_spec(tokenizer, spm_vocab_size, character_coverage)
    prepare_input = functools.partial(_prepare_input, input, encoding=encoding, split=split, mirror=mirror, glob=glob, tokenizer=spec)
    if nproc is not None and nproc != 1:
        # The launcher prepares the data once, then every rank reads that prepared dir, into one run dir.
        _launch_ranks(nproc, _forwarded_args(ctx, {"input": prepare_input(), "out": out, "nproc": None}))
        return
    world = distributed.setup(pick_device(train_cfg.device), backend)
    try:
        data = PreparedData(world.in_turn(lambda: prepare_input(show=world.is_main)))  # one writer per cache dir
        display = TrainDisplay(err) if world.is_main else None
        try:
            result = Trainer(model_cfg, train_cfg, data, out, resume=resumed, init_from=init, report=display, world=world).run()
        finally:
            if display is not None:
                display.close()
    except Exception as e:
        _rank_failed(world, e)
    finally:
        world.close()
    if world.is_main:
        err.print(
            f"done: step {result['step']:,}, best val {result['best_val_bpc']:.4f} bits/char; "
            f"checkpoints in {result['out_dir']} (best.safetensors, last.safetensors)", soft_wrap=True)


def _prepare_input(input: str, encoding: str, split: str, mirror: Optional[Path], glob: Optional[str],
                   tokenizer: Optional[TokenizerSpec] = None, show: bool = True) -> Path:
    """The prepared dir to train on: given, or prepared (once, cached) from a text, directory or corpus."""
    files = None
    if not (Path(input).is_dir() and (Path(input) / "meta.json").exists()):
        files = prep.resolve_inputs(input, glob=glob, mirror=mirror)  # once: for a corpus name this fetches and verifies
    bar = _PrepareBar(sum(f.stat().st_size for f in files) if show and files else 0)
    with bar.bar:
        return prep.cached_prepare(input, encoding=encoding, fractions=_split(split), mirror=mirror, progress=bar, glob=glob,
                                   tokenizer=tokenizer, files=files)


def _launch_ranks(nproc: int, rank_args: list[str]) -> None:
    """`--nproc N`: torchrun's N ranks on this machine; a failed rank has printed its own line."""
    try:
        distributed.launch(nproc, rank_args)
    except distributed.RanksFailed as e:
        if e.reported:
            raise typer.Exit(1)
        raise


def _forwarded_args(ctx: typer.Context, overrides: dict) -> list[str]:
    """The train command's arguments as the user gave them (plus overrides; None drops one), for the ranks."""
    args: list[str] = []
    for param in ctx.command.params:
        given = ctx.get_parameter_source(param.name)
        value = overrides[param.name] if param.name in overrides else ctx.params.get(param.name)
        if value is None or (param.name not in overrides and given is not None and given.name == "DEFAULT"):
            continue  # left out, the ranks resolve the same default
        if param.param_type_name == "argument":
            args.insert(0, str(value))
        else:
            args += [param.opts[0], str(value)]
    return args


def _rank_failed(world: distributed.World, e: Exception) -> NoReturn:
    """A rank's failure, as one line that names the rank; a single process re-raises as usual."""
    if world.size == 1:
        raise e
    if isinstance(e, TrainingStopped):  # a NaN or Ctrl-C stops every rank at the same step: rank 0 says why
        if world.is_main:
            raise e
        raise typer.Exit(1)
    if isinstance(e, (typer.Exit, KeyboardInterrupt)):
        raise e
    if distributed.is_peer_failure(e):
        # Almost always another rank died first and torchrun is about to stop this one: wait for
        # that, so the failing rank's message is the only one. Still alive? Then say it.
        time.sleep(5)
        raise CharlmError(f"rank {world.rank}: lost contact with the other ranks ({_first_line(e)})") from None
    if isinstance(e, OSError) and getattr(e, "filename", None):
        raise CharlmError(f"rank {world.rank}: {e.strerror or e}: {e.filename}") from None
    what = str(e) if isinstance(e, CharlmError) else f"{type(e).__name__}: {_first_line(e)}"
    raise CharlmError(f"rank {world.rank}: {what}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- decoding commands ----------------------------------------------------------------------
def _load_scorers(paths: list[Path], device: str, dtype: str) -> list[ModelScorer]:
    if dtype not in config.DTYPES:
        raise CharlmError(f"--dtype must be one of {', '.join(config.DTYPES)} (got {dtype!r})")
    dev = pick_device(device)
    scorers = []
    for p in paths:
        ckpt = checkpoint.load(p)
        scorers.append(ModelScorer(ckpt.build_model().to(dev), ckpt.vocab, dtype=dtype))
    return scorers


def _parse_weights(weights: Optional[str]) -> Optional[list[float]]:
    if weights is None:
        return None
    try:
        return [float(w) for w in weights.split(",")]
    except ValueError:
        raise CharlmError(f"--weights expects numbers separated by commas, e.g. 0.5,0.3,0.2 (got {weights!r})") from None


def _scorer(paths: list[Path], device: str, weights: Optional[str], combine: str, dtype: str = "fp32"):
    members = _load_scorers(paths, device, dtype)
    if len(members) == 1 and weights is None:
        return members[0], members
    return Ensemble(members, _parse_weights(weights), combine), members


CkptArg = Annotated[List[Path], typer.Argument(help="One checkpoint, or several for an ensemble.", show_default=False)]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Ensemble weights, one per model, e.g. 0.5,0.3,0.2.")]
CombineOpt = Annotated[str, typer.Option(help="Ensemble rule: mean (of probabilities) or geometric (normalized).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="fp32, or bf16 matrix products (much faster for batches and beams on CPUs with bf16 units; fp32 is best for one stream).")]


@app.command()
@friendly
def sample(
    checkpoints: CkptArg,
    length: Annotated[int, typer.Option(help="Symbols to generate: characters, or pieces for a SentencePiece model.")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from (run through the network first, then printed).")] = "",
    unknown: Annotated[str, typer.Option(help="Prime characters outside a char vocabulary: error, or skip (the model never sees them).")] = "error",
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
):
    """Generate text, streaming it to stdout as it is produced."""
    chain = processors(temperature, top_k, top_p)
    scorer, _ = _scorer(checkpoints, device, weights, combine, dtype)
    vocab = scorer.vocab
    prime_t = _prime_ids(vocab, prime, unknown)
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


def _prime_ids(vocab, prime: str, unknown: str = "error") -> torch.Tensor:
    """The prime as ids; with no prime (or none left), start as if after a line break (or from the first symbol)."""
    if unknown not in ("error", "skip"):
        raise CharlmError(f"--unknown must be error or skip (got {unknown!r})")
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
    length: Annotated[int, typer.Option(help="Symbols to generate at most: characters, or pieces for a SentencePiece model.")] = 100,
    beam_width: Annotated[int, typer.Option(help="Hypotheses kept at each step (K); 1 is greedy decoding.")] = 5,
    n_best: Annotated[int, typer.Option(help="How many of the best continuations to print (M <= K).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Rank by log-prob / length**A; 0 ranks by the total log-prob.")] = 0.0,
    stop_at: Annotated[Optional[str], typer.Option(help="End a hypothesis when it produces this text (e.g. a newline: $'\\n').")] = None,
    unknown: Annotated[str, typer.Option(help="Prime characters outside a char vocabulary: error, or skip (the model never sees them).")] = "error",
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {text, logprob, bits_per_char}.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Beam search for the most likely continuation(s).

    Deterministic: temperature, top-k and top-p apply to `charlm sample`, not to beam search.
    """
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
                     "bits_per_char": -logprob / math.log(2) / max(len(new), 1)})
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
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
    data = PreparedData(data_dir or meta["provenance"]["data_dir"])
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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (ensemble figures at the top, members in 'members').")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Bits per character and perplexity, the text scored as one stream with the state carried through.

    Always per character of the text, whatever the model's unit; a SentencePiece model also gets bits per token.
    """
    if unknown not in ("error", "skip"):
        raise CharlmError(f"--unknown must be error or skip (got {unknown!r})")
    scorer, members = _scorer(checkpoints, device, weights, combine, dtype)
    tokens, text_chars = _eval_tokens(checkpoints[0], scorer.vocab, split, text, data, unknown)
    if len(tokens) < 2:
        raise CharlmError("the text to score has fewer than 2 characters")
    chars = scored_chars(scorer.vocab, tokens, text_chars)
    result = _per_char(evaluate(scorer, tokens, chars=chars))
    rows = []
    if len(members) > 1:
        rows = [{"checkpoint": str(p), **_per_char(evaluate(m, tokens, chars=chars))} for p, m in zip(checkpoints, members)]
    source = str(text) if text else split
    if as_json:
        payload = {**result, "source": source}
        if rows:
            payload["members"] = rows
            payload["combine"] = combine
        print(json.dumps(payload))
        return
    per_token = "bits_per_token" in result
    columns = ["model", "bits/char", "perplexity", "chars"] + (["bits/token", "tokens"] if per_token else [])
    table = Table(*columns, title=f"charlm eval on {source}")
    name = f"ensemble ({combine}, {len(members)} models)" if rows else str(checkpoints[0])
    for label, r in [(r["checkpoint"], r) for r in rows] + [(name, result)]:
        cells = [label, f"{r['bits_per_char']:.4f}", f"{r['perplexity']:.3f}", f"{r['chars']:,}"]
        table.add_row(*cells, *([f"{r['bits_per_token']:.4f}", f"{r['tokens']:,}"] if per_token else []))
    Console().print(table)


def _per_char(result: dict) -> dict:
    """An evaluation record, with bits per token only where tokens are not characters."""
    if result["tokens"] == result["chars"]:
        result = {k: v for k, v in result.items() if k != "bits_per_token"}
    return result


@app.command()
@friendly
def info(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False,
):
    """Show what a checkpoint holds: model, vocabulary, training config, metrics, provenance."""
    c = checkpoint.load(ckpt)
    if as_json:
        print(json.dumps(c.meta, indent=1, ensure_ascii=False))
        return
    table = Table("field", "value", title=str(ckpt), show_lines=False)
    table.add_row("format", f"{checkpoint.FORMAT} v{checkpoint.VERSION}")
    vocab = c.vocab
    if vocab.kind == "spm":
        table.add_row("vocabulary", vocab.describe()[0].upper() + vocab.describe()[1:])
    else:
        table.add_row("vocabulary", f"{len(vocab)} {vocab.kind} symbols: {''.join(vocab.symbol(i) for i in range(min(len(vocab), 100)))!r}")
    for section in ("model", "metrics", "provenance", "train"):
        for k, v in c.meta.get(section, {}).items():
            if isinstance(v, float):
                v = f"{v:.4f}" if math.isfinite(v) else str(v)
            table.add_row(f"{section}.{k}", str(v))
    table.add_row("training state", "yes (resumable)" if c.has_train_state else "no (weights only)")
    table.add_row("tensors", f"{len(c.tensors)} ({sum(t.numel() for t in c.model_state().values()):,} model parameters)")
    Console().print(table)


@app.command()
@friendly
def bench(
    quick: Annotated[bool, typer.Option(help="A smaller run, under a minute.")] = False,
    num_layers: Annotated[int, typer.Option(help="LSTM layers of the measured model.")] = 2,
    rnn_size: Annotated[int, typer.Option(help="LSTM width of the measured model.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Training batch.")] = 64,
    seq_length: Annotated[int, typer.Option(help="Training window.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
):
    """Measure this machine: matrix-product roof, training, sampling, beam, ensemble, prepare speed."""
    from charlm import bench as b  # imported here: only this command needs it

    r = b.run_all(quick, num_layers, rnn_size, batch_size, seq_length, progress=lambda s: err.print(f"measuring {s} ..."))
    if as_json:
        print(json.dumps(r))
        return
    t, roof = r["train"], r["roof"]
    table = Table("what", "measured", "note", title=f"charlm bench ({r['machine']['threads']} threads, torch {r['machine']['torch']})")
    table.add_row("roof fp32", f"{roof['fp32_gflops']:,.0f} GFLOP/s", "best of torch.mm and oneDNN, square and LSTM-shaped products")
    table.add_row("roof bf16", f"{roof['bf16_gflops']:,.0f} GFLOP/s", f"{roof['bf16_gflops'] / roof['fp32_gflops']:.1f}x fp32")
    for key, label in (("reference_fp32", "train, plain nn.LSTM loop, fp32"), ("fp32", "train, charlm fp32"), ("bf16", "train, charlm bf16")):
        note = f"{t[key]['gflops']:,.0f} GFLOP/s = {t[key]['fraction_of_roof']:.0%} of the {'bf16' if key == 'bf16' else 'fp32'} roof"
        if key != "reference_fp32":
            note += f"; {t[key + '_over_reference']:.2f}x the reference"
        table.add_row(label, f"{t[key]['chars_per_s']:,} chars/s", note)
    for case, label in (("single", "sample, 1 stream"), ("batch64", "sample, 64 streams")):
        row = r["sample"][case]
        table.add_row(label, f"{row['chars_per_s']:,} chars/s", f"{row['dtype']} products" + (", total over the batch" if case == "batch64" else ""))
    for dtype in ("fp32", "bf16"):
        beam, ens = r["beam"][dtype], r["ensemble"][dtype]
        table.add_row(f"beam width 1 / 10, {dtype}", f"{beam['width1_ms_per_char']} / {beam['width10_ms_per_char']} ms/char",
                      f"width 10 costs {beam['width10_over_width1']}x width 1")
        table.add_row(f"ensemble of 3, {dtype}", f"{ens['three_chars_per_s']:,} / {ens['three_batch64_chars_per_s']:,} chars/s",
                      f"1 / 64 streams: {ens['three_over_one']}x / {ens['three_over_one_batch64']}x one model's time")
    table.add_row("prepare", f"{r['prepare']['mb_per_s']:,} MB/s", f"{r['prepare']['megabytes']} MiB synthetic ASCII text")
    Console().print(table)
    Console().print(f"model: {t['model']}")


# -- plot -----------------------------------------------------------------------------------
@app.command()
@friendly
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A training run's --out dir (holding metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The PNG to write; default RUN_DIR/loss.png.")] = None,
):
    """Draw train and validation bits/char against characters seen, from RUN_DIR/metrics.jsonl, as a PNG."""
    from charlm.plot import plot_run  # imported here: matplotlib is optional and only this command needs it

    err.print(f"wrote {plot_run(run_dir, out)}", soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors become one line and exit code 1, like every other error."""
    try:
        code = app(args=argv, standalone_mode=False)
    except UsageError as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx else ""
        err.print(Text("error: ", style="bold red") + Text(e.format_message() + hint), soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort) as e:
        err.print(Text("error: ", style="bold red") + Text("interrupted"))
        sys.exit(1)
    except Exception as e:
        if type(e).__name__ != "Abort":  # typer's internal Abort (Ctrl-C at a prompt)
            raise
        err.print(Text("error: ", style="bold red") + Text("aborted"))
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
