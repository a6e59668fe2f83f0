"""The train command: parse, call charlm's `train` (charlm/api/training.py), print the outcome.

The config options (--lr, --rnn-size, ...) are not written here: `config_options` makes one flag per
option declared in charlm/config.py, with its help and default from the declaration. `--nproc N`
runs torchrun's N ranks, each of which runs this command and so trains through the API. Nothing
heavy is imported before the command runs: `charlm train --help` loads no torch.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

from charlm import config
from charlm.cli.app import app, err, friendly
from charlm.cli.data import CoverageOpt, TokenizerOpt, VocabSizeOpt
from charlm.errors import CharlmError, OptionError
from charlm.terminal import shown


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give `fn` one flag per config option in place of its **options, placed after its `init_from` (the --help order)."""
    params = list(inspect.signature(fn, eval_str=True).parameters.values())
    flags = [
        inspect.Parameter(d.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=_flag(d))
        for d in config.declared_options()
    ]
    at = [p.name for p in params].index("init_from") + 1
    kept = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fn.__signature__ = inspect.Signature(kept[:at] + flags + kept[at:])  # type: ignore[attr-defined]
    return fn


def _flag(d: config.Declared) -> Any:
    """A declared option as a Typer parameter: None when not given, so that presets and config files still apply."""
    decls = [f"--{d.name.replace('_', '-')}"] if d.option.switch else []  # a switch: --compile alone, no --no-compile
    return Annotated[Optional[d.option.flag_type or d.type], typer.Option(*decls, help=d.help, show_default=False)]


@app.command()
@friendly
@config_options
def train(
    ctx: typer.Context,
    input: Annotated[
        Optional[str],
        typer.Argument(help="A text file, a prepared dir or a corpus name. With --resume: optional.", show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run dir for checkpoints and metrics.jsonl (default: checkpoints/RUN).")
    ] = None,
    preset: Annotated[Optional[str], typer.Option(help=f"A shipped preset: {', '.join(config.list_presets())}.")] = None,
    config_file: Annotated[
        Optional[Path], typer.Option("--config", help="A YAML file of option: value (explicit flags win).")
    ] = None,
    resume: Annotated[
        Optional[str],
        typer.Option(
            help="Continue exactly from a last.safetensors (optimizer, step, data position, state); 'auto': from OUT/last.safetensors if it exists, else start fresh (for preemptible queues).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the run in --out (its checkpoints and metrics.jsonl) instead of refusing to."),
    ] = False,
    init_from: Annotated[
        Optional[Path], typer.Option(help="Start from a checkpoint's weights only (fresh optimizer and schedule).")
    ] = None,
    encoding: Annotated[str, typer.Option(help="For a text input: utf-8 or bytes.")] = "utf-8",
    split: Annotated[str, typer.Option(help="For a text input: train,val,test fractions.")] = "0.9,0.05,0.05",
    tokenizer: TokenizerOpt = None,
    spm_vocab_size: VocabSizeOpt = None,
    character_coverage: CoverageOpt = None,
    glob: Annotated[Optional[str], typer.Option(help="For a directory input: files to include.")] = None,
    mirror: Annotated[Optional[Path], typer.Option(help="Corpus mirror dir, for corpus names.")] = None,
    nproc: Annotated[
        Optional[int],
        typer.Option(
            help="Data-parallel on N processes of this machine (runs torchrun for you); --batch-size is per process.",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="With several processes: auto (NCCL on CUDA, Gloo on CPU), nccl or gloo.")
    ] = "auto",
    **options: Any,
) -> None:
    """Train a character-level RNN with truncated backpropagation through time.

    Data-parallel: `charlm train --nproc N ...`, or `torchrun --nproc-per-node N -m charlm train ...`.
    """
    from charlm.api import training
    from charlm.cli.stop import SignalsEnd, StopRequests

    run_args = dict(preset=preset, config=config_file, resume=resume, init_from=init_from, **options)
    data_args = dict(
        encoding=encoding,
        split=split,
        tokenizer=tokenizer,
        vocab_size=spm_vocab_size,
        character_coverage=character_coverage,
        glob=glob,
        mirror=mirror,
    )
    if nproc is not None and nproc != 1:
        _launch(ctx, training.plan(input, out, **run_args), nproc, data_args, overwrite)
        return
    try:
        # SIGTERM or SIGHUP while the data is fetched or prepared: stop at once, cleaning up. StopRequests
        # takes over for the training loop only: a signal then finishes the step, saves and stops the run.
        # Not in a torchrun rank: there a SIGTERM outside the loop is torchrun ending the ranks after
        # another one failed, and the failed rank's line is the one to read.
        with SignalsEnd("train") if not in_torchrun() else contextlib.nullcontext():
            result = training.train(
                input, out, overwrite=overwrite, progress=True, stop=StopRequests(), backend=backend, **run_args, **data_args
            )
    except training.RankStopped:
        raise typer.Exit(1) from None  # rank 0 says why
    if result.stopped:
        raise CharlmError(result.stopped)
    if result.rank == 0:
        best = "-" if result.best_val_bpc is None else f"{result.best_val_bpc:.4f}"
        err.print(
            f"done: step {result.step:,}, best val {best} bits/char; "
            f"checkpoints in {shown(result.out_dir)} (best.safetensors, last.safetensors)",
            soft_wrap=True,
        )


def in_torchrun() -> bool:
    """A rank of several (torchrun's environment); distributed.in_torchrun without importing torch."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def _launch(ctx: typer.Context, run: Any, nproc: int, data_args: dict, overwrite: bool) -> None:
    """--nproc N: the launcher prepares the data once, then every rank reads that prepared dir, into one run dir."""
    from charlm.api.progress import ProgressDisplay
    from charlm.cli import ranks
    from charlm.cli.stop import SignalsEnd
    from charlm.data import PreparedData
    from charlm.training import runlock

    if nproc < 1:  # before anything is prepared or claimed
        raise OptionError(f"--nproc must be at least 1 (got {nproc})")
    with runlock.held(run.out):  # the launcher owns the run dir for its ranks (they find it held by it)
        display = ProgressDisplay(err)
        try:
            with SignalsEnd("train"):
                prepared = run.prepare_data(**data_args, progress=display)
        finally:
            display.close()
        for warning in ranks.check_nproc(nproc, run.model_cfg, run.train_cfg, len(PreparedData(prepared).vocab)):
            err.print(f"warning: {warning}", soft_wrap=True, markup=False, highlight=False)
        run.claim(overwrite)
        ranks.mark_launcher()
        _launch_ranks(nproc, _forwarded_args(ctx, {"input": prepared, "out": run.out, "nproc": None, "overwrite": None}))


def _launch_ranks(nproc: int, rank_args: list[str]) -> None:
    """`--nproc N`: torchrun's N ranks on this machine; a failed rank has printed its own line."""
    from charlm.training import distributed

    try:
        distributed.launch(nproc, rank_args)
    except distributed.RanksFailed as e:
        if e.reported:
            raise typer.Exit(1) from None
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
