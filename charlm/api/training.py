"""Prepare and train from Python: `charlm.prepare(...)` and `charlm.train(...)`, which `charlm prepare`
and `charlm train` call.

    result = charlm.train("input.txt", "run", preset="demo", max_steps=500)
    lm = charlm.load(result.best)

The training options are the config's (charlm/config.py: the YAML keys, and with dashes the flags):
defaults < preset < config file < keywords. `progress` is True (a display on stderr: a live bar on a
terminal and in Jupyter), False (silent) or a callable that receives each `Progress`; `stop` is a
callable (or a threading.Event) polled at every step: once it answers, the run saves
last.safetensors and `train` returns with `stopped` set, to be continued with resume=. A progress
display whose output closes (BrokenPipeError: `charlm train ... | head`) is a stop request too.

One training per run dir: `train` holds OUT's lock (charlm/training/runlock.py) from before
anything is written there until it returns; another training on the same OUT meanwhile raises
CharlmError("OUT is in use by process N; wait or choose another --out").
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from charlm.api.progress import Progress, ProgressDisplay, Sink, prepare_reporter
from charlm.api.runplan import DEFAULT_SPLIT, RunPlan, plan, split_fractions, tokenizer_spec
from charlm.errors import CharlmError, OptionError

if TYPE_CHECKING:
    from charlm.training.distributed import World

__all__ = ["Progress", "RankStopped", "RunPlan", "TrainResult", "plan", "prepare", "train"]

ProgressArg = Union[bool, Callable[[Progress], Any]]
StopArg = Union[Callable[[], Any], threading.Event, None]
CLOSED_OUTPUT = "a closed pipe"  # the stop reason when the progress display's reader went away ("stopped by a closed pipe")


@dataclass(frozen=True)
class TrainResult:
    """What a training run left: its files and its last figures (bits per character; None: not measured)."""

    out_dir: Path
    last: Path  # last.safetensors: the full training state, for resume=
    best: Path | None  # best.safetensors: the weights with the lowest validation figure (None before the first evaluation)
    data_dir: Path  # the prepared data it trained on
    step: int
    epoch: float
    train_bpc: float | None  # over the last log_every steps
    val_bpc: float | None  # at the last evaluation
    best_val_bpc: float | None
    elapsed_s: float  # seconds of training, across resumes
    stopped: str | None = None  # why the run ended early (a stop request), with the command that continues it
    rank: int = 0  # this process's rank under torchrun (0 otherwise); rank 0 writes the files


class RankStopped(CharlmError):
    """This rank of a data-parallel run stopped with the others (a stop request or a non-finite loss): rank 0 says why."""


# -- prepare --------------------------------------------------------------------------------------
def prepare(
    input: str | Path,
    out: str | Path,
    *,
    glob: str | None = None,
    encoding: str = "utf-8",
    split: str | Sequence[float] = DEFAULT_SPLIT,
    mirror: str | Path | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    character_coverage: float | None = None,
    vocab_from: str | Path | None = None,
    progress: ProgressArg = True,
) -> Path:
    """Encode a text file, a directory (its files matching `glob`) or a registered corpus into `out`:
    meta.json plus train.bin, val.bin, test.bin. Returns `out`; its meta.json says what was made.

    vocab_from: a checkpoint whose vocabulary the text is encoded with, for fine-tuning it: every old
    id kept, the text's new characters appended (a SentencePiece tokenizer is kept as it is)."""
    from charlm import checkpoint
    from charlm.data import prepare as prep

    spec = tokenizer_spec(tokenizer, vocab_size, character_coverage)
    fractions = split_fractions(split)
    base = checkpoint.load(Path(vocab_from)).vocab if vocab_from is not None else None
    files = prep.resolve_inputs(input, glob=glob, mirror=None if mirror is None else str(mirror))
    with _display(progress) as sink:
        prep.prepare(
            files,
            Path(out),
            encoding=encoding,
            fractions=fractions,
            progress=prepare_reporter(sink),
            tokenizer=spec,
            base_vocab=base,
        )
    return Path(out)


@contextlib.contextmanager
def _display(progress: ProgressArg):
    """progress=True: the default display, closed at the end; a callable as it is; False: None."""
    if progress is True:
        display = ProgressDisplay()
        try:
            yield display
        finally:
            display.close()
    elif progress is False or progress is None:
        yield None
    elif callable(progress):
        yield progress
    else:
        raise OptionError(f"progress must be True, False or a callable that takes a Progress (got {progress!r})")


# -- train ----------------------------------------------------------------------------------------
def train(
    input: str | Path | None = None,
    out: str | Path | None = None,
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressArg = True,
    stop: StopArg = None,
    encoding: str = "utf-8",
    split: str | Sequence[float] = DEFAULT_SPLIT,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    character_coverage: float | None = None,
    glob: str | None = None,
    mirror: str | Path | None = None,
    backend: str = "auto",
    **options: Any,
) -> TrainResult:
    """Train a model on `input` (a text file, a directory, a corpus name or a prepared dir) into the run dir `out`.

    `options`: the config's options (lr=, max_steps=, rnn_size=, ...). resume=: a last.safetensors
    to continue exactly, or "auto" (OUT/last.safetensors if it exists); init_from=: a checkpoint's
    weights only. encoding, split, tokenizer, vocab_size, character_coverage, glob and mirror say
    how a text is prepared (once, cached). Under torchrun each rank calls this, with `backend`.
    """
    from charlm.data import PreparedData
    from charlm.devices import pick_device
    from charlm.training import distributed

    run = plan(input, out, preset=preset, config=config, resume=resume, init_from=init_from, **options)
    polled = _StopPoll(stop)
    with _display(progress) as shown:
        world = distributed.setup(pick_device(run.train_cfg.device), backend)
        sink = shown if world.is_main else None
        try:
            with _owning(run.out, world):  # before anything is written into OUT; OUT checked writable here
                data_dir = world.in_turn(
                    lambda: run.prepare_data(  # one writer per cache dir
                        encoding=encoding,
                        split=split,
                        tokenizer=tokenizer,
                        vocab_size=vocab_size,
                        character_coverage=character_coverage,
                        glob=glob,
                        mirror=mirror,
                        progress=sink,
                    )
                )
                return _run(run, PreparedData(data_dir), world, sink, polled, stop, overwrite)
        except Exception as e:
            if world.size == 1:
                raise
            raise _rank_error(world, e) from None
        finally:
            world.close()


def _owning(out: Path, world: World) -> contextlib.AbstractContextManager:
    """The run dir's lock (training/runlock.py), held by rank 0 (or a single process) for the whole run;
    under `charlm train --nproc` the launcher holds it and rank 0 finds it so."""
    from charlm.training import runlock

    if not world.is_main:
        return contextlib.nullcontext()
    try:
        launcher = int(os.environ.get(runlock.LAUNCHER_ENV, ""))
    except ValueError:
        launcher = None
    return runlock.held(out, allow_holder=launcher)


def _run(
    run: RunPlan, data: Any, world: World, sink: Sink | None, polled: _StopPoll, stop: StopArg, overwrite: bool
) -> TrainResult:
    """Build the trainer and train; a stop request ends in a result that says so."""
    from charlm.training.trainer import Trainer, TrainingStopped

    reports = _Reports(sink, polled)
    # A stop that is also a context manager (the CLI's signal handlers) is entered for training only:
    # while the data is fetched or prepared, Ctrl-C interrupts at once.
    entered: Any = stop if hasattr(stop, "__enter__") and hasattr(stop, "__exit__") else contextlib.nullcontext()
    with entered:
        trainer = Trainer(
            run.model_cfg,
            run.train_cfg,
            data,
            run.out,
            resume=run.resumed,
            init_from=run.init,
            report=reports,
            world=world,
            stop=polled,
        )
        if world.is_main:  # everything is checked: only now may another run's files be replaced
            run.claim(overwrite)
        stopped = None
        try:
            trainer.run()
        except TrainingStopped as e:
            if not world.is_main:
                raise RankStopped(str(e)) from None
            if polled.reason is None:  # not asked to stop: a non-finite loss, an error
                raise
            stopped = str(e)
    p = trainer.progress
    best = run.out / "best.safetensors"
    return TrainResult(
        out_dir=run.out,
        last=run.out / "last.safetensors",
        best=best if best.exists() else None,
        data_dir=Path(data.dir),
        step=p.step,
        epoch=p.epoch + p.window / len(trainer.batcher),
        train_bpc=_finite(reports.train_bpc),
        val_bpc=_finite(reports.val_bpc),
        best_val_bpc=_finite(p.best_val),
        elapsed_s=p.elapsed,
        stopped=stopped,
        rank=world.rank,
    )


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class _Reports:
    """The trainer's `report(kind, record)`, passed on as Progress; keeps the last figures for the result."""

    def __init__(self, sink: Sink | None, polled: _StopPoll):
        self.sink = sink
        self.polled = polled
        self.train_bpc: float | None = None
        self.val_bpc: float | None = None

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "train":
            self.train_bpc = info.get("train_bpc")
        elif kind == "val":
            self.val_bpc = info.get("val_bpc")
        if self.sink is not None:
            try:
                self.sink(Progress.of(kind, info))
            except BrokenPipeError:
                # The log's reader went away (`charlm train ... 2>&1 | head`): costs what SIGTERM costs,
                # the step finishes, last.safetensors is saved and the run stops; nothing more is shown.
                self.sink = None
                self.polled.closed_output = True


class _StopPoll:
    """`stop` as the trainer polls it: None, or the reason (a signal's name, what the callable said, or 'request')."""

    def __init__(self, stop: StopArg):
        if stop is not None and not callable(stop) and not hasattr(stop, "is_set"):
            raise OptionError(f"stop must be a callable or a threading.Event (got {stop!r})")
        self.stop = stop
        self.reason: str | None = None
        self.closed_output = False  # the progress display's pipe closed: a stop request of its own

    def __call__(self) -> str | None:
        if self.closed_output and self.reason is None:
            self.reason = CLOSED_OUTPUT
        if self.stop is None or self.reason is not None:
            return self.reason
        asked = self.stop.is_set() if hasattr(self.stop, "is_set") else self.stop()
        if asked:
            self.reason = asked if isinstance(asked, str) else "request"
        return self.reason


def _rank_error(world: World, e: Exception) -> BaseException:
    """A rank's failure as one line that names the rank."""
    from charlm.training import distributed
    from charlm.training.trainer import TrainingStopped

    if isinstance(e, (RankStopped, TrainingStopped)):  # rank 0's TrainingStopped (a NaN, a stop): its message says it all
        return e
    if distributed.is_peer_failure(e):
        # Almost always another rank died first and torchrun is about to stop this one: wait for
        # that, so the failing rank's message is the only one. Still alive? Then say it.
        time.sleep(5)
        return CharlmError(f"rank {world.rank}: lost contact with the other ranks ({_first_line(e)})")
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return CharlmError(f"rank {world.rank}: {e.strerror or e}: {e.filename}")
    what = str(e) if isinstance(e, CharlmError) else f"{type(e).__name__}: {_first_line(e)}"
    return CharlmError(f"rank {world.rank}: {what}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
