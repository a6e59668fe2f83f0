"""The train command: options, resume and run-dir rules, one process or data-parallel ranks.

The trainer, distributed and prepare modules are imported inside the command, so that loading the
command line for another command never loads them.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn, Optional

import typer
from typing_extensions import Annotated

from charlm import checkpoint, config
from charlm.errors import CharlmError
from charlm.cells import cell_names
from charlm.cli.app import app, err, friendly
from charlm.cli.data import (
    CoverageOpt,
    TokenizerOpt,
    VocabSizeOpt,
    _PrepareBar,
    _split,
    _tokenizer_spec,
)
from charlm.cli.display import TrainDisplay
from charlm.cli.stop import StopRequests
from charlm.data import PreparedData
from charlm.devices import check_dtype, pick_device
from charlm.tokenizers.spm import TokenizerSpec


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
    resume: Annotated[Optional[str], typer.Option(help="Continue exactly from a last.safetensors (optimizer, step, data position, state); 'auto': from OUT/last.safetensors if it exists, else start fresh (for preemptible queues).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out (its checkpoints and metrics.jsonl) instead of refusing to.")] = False,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from a checkpoint's weights only (fresh optimizer and schedule).")] = None,
    cell: Annotated[Optional[str], typer.Option(help=f"{', '.join(cell_names())} (default: lstm; see charlm/cells/).", show_default=False)] = None,
    num_layers: Annotated[Optional[int], typer.Option(help="Recurrent layers (default: 2).", show_default=False)] = None,
    rnn_size: Annotated[Optional[int], typer.Option(help="Hidden units per layer (default: 256).", show_default=False)] = None,
    embed_size: Annotated[Optional[int], typer.Option(help="Embedding width (default: 64).", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout between layers and before the head (default: 0).", show_default=False)] = None,
    forget_bias: Annotated[Optional[float], typer.Option(help="LSTM family (lstm, peephole, minlstm): the forget gate's initial bias (default: 0; other cells ignore it).", show_default=False)] = None,
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
    compile: Annotated[Optional[bool], typer.Option("--compile", help="torch.compile the model for training: meant for CUDA; the first steps are slow while it compiles (default: off).", show_default=False)] = None,
    scheduled_sampling: Annotated[Optional[str], typer.Option(help="Feed the model its own predictions with a probability growing over training: none, linear, exponential or inverse-sigmoid (the teacher-forcing probability's decay; default: none).", show_default=False)] = None,
    ss_k: Annotated[Optional[float], typer.Option(help="The decay's k: linear, steps to fall from 1 to 0 (default 1000); exponential, factor per step in (0, 1) (0.999); inverse-sigmoid, k/(k+exp(step/k)), >= 1 (100).", show_default=False)] = None,
    ss_floor: Annotated[Optional[float], typer.Option(help="The lowest teacher-forcing probability, in [0, 1] (default: 0.5; 1 = plain training).", show_default=False)] = None,
    ss_mode: Annotated[Optional[str], typer.Option(help="What replaces a true input: model (a sample of its prediction) or uniform (a random symbol) (default: model).", show_default=False)] = None,
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
    plan = _plan({k: v for k, v in locals().items() if k in config.all_keys()}, preset, config_file, input, out, resume, init_from)
    spec = _tokenizer_spec(tokenizer, spm_vocab_size, character_coverage)
    prepare_input = functools.partial(_prepare_input, plan.input, encoding=encoding, split=split, mirror=mirror, glob=glob, tokenizer=spec)
    if nproc is not None and nproc != 1:
        _launch(ctx, plan, nproc, prepare_input, overwrite)
    else:
        _train_here(plan, backend, prepare_input, overwrite)


@dataclass
class _Plan:
    """What a train command resolved to, before any data is read: configs, checkpoints, input, run dir."""

    model_cfg: config.ModelConfig
    train_cfg: config.TrainConfig
    resumed: Optional[checkpoint.Checkpoint]
    init: Optional[checkpoint.Checkpoint]
    input: str
    out: Path


def _plan(explicit: dict, preset, config_file, input, out, resume, init_from) -> _Plan:
    """defaults < preset < --config < flags, over a resumed checkpoint's configuration or an --init-from's model."""
    layers = [config.load_preset(preset)] if preset else []
    if config_file:
        layers.append(config.load_config_file(config_file))
    layers.append(explicit)
    resume_path = _resume_target(resume, out)
    resumed = checkpoint.load(resume_path) if resume_path else None
    init = checkpoint.load(init_from) if init_from else None
    if resumed is not None and init is not None:
        raise CharlmError("give --resume (continue a run) or --init-from (a new run from its weights), not both")
    if resumed is not None:
        model_cfg, train_cfg = _resume_config(resumed, layers)
        input = input or _recorded_data(resumed)
        out = out or resumed.path.parent
    else:
        if input is None:
            raise CharlmError("give a text file, prepared dir or corpus name to train on (or --resume CKPT)")
        base = {"model": init.meta["model"]} if init is not None else None
        model_cfg, train_cfg = config.resolve(*layers, base=base)
        out = out or Path("checkpoints") / _run_name(input)
    check_dtype(pick_device(train_cfg.device), train_cfg.dtype)  # before any data is fetched or prepared
    return _Plan(model_cfg, train_cfg, resumed, init, input, Path(out))


def _launch(ctx: typer.Context, plan: _Plan, nproc: int, prepare_input, overwrite: bool) -> None:
    """--nproc N: the launcher prepares the data once, then every rank reads that prepared dir, into one run dir."""
    from charlm.training import rundir

    if nproc < 1:  # before anything is prepared or claimed
        raise CharlmError(f"--nproc must be at least 1 (got {nproc})")
    prepared = prepare_input()
    rundir.claim(plan.out, resuming=plan.resumed is not None, overwrite=overwrite)
    _launch_ranks(nproc, _forwarded_args(ctx, {"input": prepared, "out": plan.out, "nproc": None, "overwrite": None}))


def _train_here(plan: _Plan, backend: str, prepare_input, overwrite: bool) -> None:
    """This process trains: alone, or as one rank that torchrun started."""
    from charlm.training import distributed, rundir
    from charlm.training.trainer import Trainer

    world = distributed.setup(pick_device(plan.train_cfg.device), backend)
    try:
        data = PreparedData(world.in_turn(lambda: prepare_input(show=world.is_main)))  # one writer per cache dir
        display = TrainDisplay(err) if world.is_main else None
        try:
            with StopRequests() as stop:
                trainer = Trainer(plan.model_cfg, plan.train_cfg, data, plan.out, resume=plan.resumed, init_from=plan.init,
                                  report=display, world=world, stop=stop)
                if world.is_main:  # everything is checked: only now may another run's files be replaced
                    rundir.claim(plan.out, resuming=plan.resumed is not None, overwrite=overwrite)
                result = trainer.run()
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


# Fixed by a checkpoint: the model's shape, and the seed (the random stream continues from the saved
# state, so another seed would be silently ignored). Every other option may change on resume: the
# limits, the learning-rate schedule, clipping, eval/log cadence, device, dtype, dropout, and even
# batch size and window (the carried state then restarts from zero, at the same point of the epoch).
FIXED_ON_RESUME = ("cell", "num_layers", "rnn_size", "embed_size", "forget_bias", "seed")


def _resume_target(resume: Optional[str], out: Optional[Path]) -> Optional[Path]:
    """The checkpoint --resume names; 'auto': OUT/last.safetensors when it exists, else None (start fresh)."""
    from charlm.training import rundir

    if resume is None or resume != "auto":
        return None if resume is None else Path(resume)
    if out is None:
        raise CharlmError("--resume auto continues OUT/last.safetensors: give --out too")
    last = out / rundir.LAST
    return last if last.exists() else None


def _resume_config(resumed: checkpoint.Checkpoint, layers: list[dict]) -> tuple[config.ModelConfig, config.TrainConfig]:
    """The checkpoint's configuration with the given options over it; options equal to the checkpoint's are fine."""
    saved = {"model": resumed.meta["model"], "train": resumed.meta["train"]}
    saved_model, saved_train = config.resolve(base=saved)
    kept = {**vars(saved_model), **vars(saved_train)}
    model_cfg, train_cfg = config.resolve(*layers, base=saved)
    asked = {**vars(model_cfg), **vars(train_cfg)}
    conflicts = [f"--{k.replace('_', '-')} {asked[k]} (the checkpoint has {kept[k]})" for k in FIXED_ON_RESUME if asked[k] != kept[k]]
    if conflicts:
        raise CharlmError(
            f"--resume continues the checkpoint's model and random stream, but {'; '.join(conflicts)}: drop "
            f"{'it' if len(conflicts) == 1 else 'them'}, or start a new run from its weights with --init-from"
        )
    return model_cfg, train_cfg


def _recorded_data(ckpt: checkpoint.Checkpoint) -> str:
    """The prepared dir a checkpoint was trained on, when resuming without naming the data.

    The path comes from the file, so it is trusted only as far as it is checked: it must be a
    prepared dir (never a text or a tree to prepare) holding the same source text (sha256).
    """
    provenance = ckpt.meta.get("provenance") or {}
    recorded = provenance.get("data_dir")
    retry = f"give the data to continue on: charlm train DATA --resume {ckpt.path}"
    if not isinstance(recorded, str) or not (Path(recorded) / "meta.json").is_file():
        raise CharlmError(f"{ckpt.path} was trained on {recorded!r}, which is not a prepared data dir here; {retry}")
    if PreparedData(recorded).meta.get("source", {}).get("sha256") != provenance.get("source_sha256"):
        raise CharlmError(f"{recorded} now holds other data than {ckpt.path} was trained on; {retry}")
    return recorded


def _prepare_input(input: str, encoding: str, split: str, mirror: Optional[Path], glob: Optional[str],
                   tokenizer: Optional[TokenizerSpec] = None, show: bool = True) -> Path:
    """The prepared dir to train on: given, or prepared (once, cached) from a text, directory or corpus."""
    from charlm.data import prepare as prep

    files = None
    if not (Path(input).is_dir() and (Path(input) / "meta.json").exists()):
        files = prep.resolve_inputs(input, glob=glob, mirror=mirror)  # once: for a corpus name this fetches and verifies
    bar = _PrepareBar(sum(f.stat().st_size for f in files) if show and files else 0)
    with bar.bar:
        return prep.cached_prepare(input, encoding=encoding, fractions=_split(split), mirror=mirror, progress=bar, glob=glob,
                                   tokenizer=tokenizer, files=files)


def _launch_ranks(nproc: int, rank_args: list[str]) -> None:
    """`--nproc N`: torchrun's N ranks on this machine; a failed rank has printed its own line."""
    from charlm.training import distributed

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
        elif getattr(param, "is_flag", False):  # a flag is its name alone: --compile, not --compile True
            if value:
                args.append(param.opts[0])
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


def _rank_failed(world, e: Exception) -> NoReturn:
    """A rank's failure, as one line that names the rank; a single process re-raises as usual."""
    from charlm.training import distributed
    from charlm.training.trainer import TrainingStopped

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

