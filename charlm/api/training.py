"""Prepare and train from Python: `charlm.prepare(...)` and `charlm.train(...)`, which `charlm prepare`
and `charlm train` call.

    result = charlm.train("input.txt", "run", preset="demo", max_steps=500)
    lm = charlm.load(result.best)

The training options are the config's (charlm/config.py: the YAML keys, and with dashes the flags):
defaults < preset < config file < keywords. `progress` is True (a display on stderr: a live bar on a
terminal and in Jupyter), False (silent) or a callable that receives each `Progress`; `stop` is a
callable (or a threading.Event) polled at every step: once it answers, the run saves
last.safetensors and `train` returns with `stopped` set, to be continued with resume=.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from charlm import checkpoint
from charlm import config as configs
from charlm.api.progress import Progress, ProgressDisplay, Sink
from charlm.errors import CharlmError, DataError, OptionError

if TYPE_CHECKING:
    from charlm.tokenizers.spm import TokenizerSpec
    from charlm.training.distributed import World

__all__ = ["Progress", "RankStopped", "RunPlan", "TrainResult", "plan", "prepare", "train"]

DEFAULT_SPLIT = (0.9, 0.05, 0.05)  # train, val, test fractions of a text

# Fixed by a checkpoint: the model's shape, and the seed (the random stream continues from the saved
# state, so another seed would be silently ignored). Every other option may change on resume: the
# limits, the learning-rate schedule, clipping, eval/log cadence, device, dtype, dropout, and even
# batch size and window (the carried state then restarts from zero, at the same point of the epoch).
FIXED_ON_RESUME = ("cell", "num_layers", "rnn_size", "embed_size", "forget_bias", "seed")

ProgressArg = Union[bool, Callable[[Progress], Any]]
StopArg = Union[Callable[[], Any], threading.Event, None]


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
    progress: ProgressArg = True,
) -> Path:
    """Encode a text file, a directory (its files matching `glob`) or a registered corpus into `out`:
    meta.json plus train.bin, val.bin, test.bin. Returns `out`; its meta.json says what was made."""
    from charlm.data import prepare as prep

    spec = _tokenizer_spec(tokenizer, vocab_size, character_coverage)
    fractions = _fractions(split)
    files = prep.resolve_inputs(input, glob=glob, mirror=None if mirror is None else str(mirror))
    with _display(progress) as sink:
        prep.prepare(files, Path(out), encoding=encoding, fractions=fractions, progress=_prepare_reports(sink), tokenizer=spec)
    return Path(out)


def _tokenizer_spec(tokenizer: str | None, vocab_size: int | None, coverage: float | None) -> TokenizerSpec | None:
    """The tokenizer options as a spec; None when none was given (a prepared dir keeps its own)."""
    if tokenizer is None and vocab_size is None and coverage is None:
        return None
    from charlm.tokenizers.spm import TokenizerSpec

    return TokenizerSpec(tokenizer or "char", vocab_size, TokenizerSpec.character_coverage if coverage is None else coverage).checked()


def _fractions(split: str | Sequence[float]) -> tuple[float, float, float]:
    """split as 'A,B,C' (the flag) or three numbers, checked."""
    from charlm.data.prepare import check_fractions

    try:
        parts = tuple(float(x) for x in (split.split(",") if isinstance(split, str) else split))
    except (TypeError, ValueError):
        raise DataError(f"--split expects three fractions like 0.9,0.05,0.05 (got {split!r})") from None
    return check_fractions(parts)  # type: ignore[arg-type]  (its length is checked there)


def _prepare_reports(sink: Sink | None) -> Callable[[str, int, int], None] | None:
    if sink is None:
        return None
    return lambda phase, done, total: sink(Progress(kind="prepare", phase=phase, done=done, total=total))


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


# -- what a run resolves to -----------------------------------------------------------------------
@dataclass
class RunPlan:
    """What a training run resolved to before any data is read: configs, checkpoints, input, run dir."""

    model_cfg: configs.ModelConfig
    train_cfg: configs.TrainConfig
    resumed: checkpoint.Checkpoint | None
    init: checkpoint.Checkpoint | None
    input: str
    out: Path

    def prepare_data(
        self,
        *,
        encoding: str = "utf-8",
        split: str | Sequence[float] = DEFAULT_SPLIT,
        tokenizer: str | None = None,
        vocab_size: int | None = None,
        character_coverage: float | None = None,
        glob: str | None = None,
        mirror: str | Path | None = None,
        progress: Sink | None = None,
    ) -> Path:
        """The prepared dir to train on: the input itself, or prepared from it once into the cache and reused."""
        from charlm.data import prepare as prep

        spec = _tokenizer_spec(tokenizer, vocab_size, character_coverage)
        fractions = _fractions(split)
        mirror_dir = None if mirror is None else str(mirror)
        files = None
        if not (Path(self.input).is_dir() and (Path(self.input) / "meta.json").exists()):
            files = prep.resolve_inputs(self.input, glob=glob, mirror=mirror_dir)  # once: a corpus name is fetched and verified here
        return prep.cached_prepare(self.input, encoding=encoding, fractions=fractions, mirror=mirror_dir, glob=glob, tokenizer=spec,
                                   files=files, progress=_prepare_reports(progress))

    def claim(self, overwrite: bool = False) -> None:
        """Make the run dir ready: another run's files are refused unless resuming it or told to overwrite them."""
        from charlm.training import rundir

        rundir.claim(self.out, resuming=self.resumed is not None, overwrite=overwrite)


def plan(
    input: str | Path | None = None,
    out: str | Path | None = None,
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
    **options: Any,
) -> RunPlan:
    """Resolve a run without reading any data: defaults < preset < config file < options, over a resumed
    checkpoint's configuration or an init_from's model; every option is checked here. Options given as None are not given."""
    from charlm.devices import check_dtype, pick_device

    configs.check_options(options, "charlm.train")
    layers = [configs.load_preset(preset)] if preset else []
    if config:
        layers.append(configs.load_config_file(Path(config)))
    layers.append(options)
    out = None if out is None else Path(out)
    resume_path = _resume_target(resume, out)
    resumed = checkpoint.load(resume_path) if resume_path else None
    init = checkpoint.load(Path(init_from)) if init_from else None
    if resumed is not None and init is not None:
        raise OptionError("give --resume (continue a run) or --init-from (a new run from its weights), not both")
    if resumed is not None:
        model_cfg, train_cfg = _resume_config(resumed, layers)
        input = input or _recorded_data(resumed)
        out = out or resumed.path.parent
    else:
        if input is None:
            raise OptionError("give a text file, prepared dir or corpus name to train on (or --resume CKPT)")
        base = {"model": init.meta["model"]} if init is not None else None
        model_cfg, train_cfg = configs.resolve(*layers, base=base)
        out = out or Path("checkpoints") / _run_name(str(input))
    check_dtype(pick_device(train_cfg.device), train_cfg.dtype)  # before any data is fetched or prepared
    return RunPlan(model_cfg, train_cfg, resumed, init, str(input), Path(out))


def _run_name(input: str) -> str:
    p = Path(input)
    stem = p.parent.name if p.name == "input.txt" else (p.name if p.is_dir() else p.stem)
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _resume_target(resume: str | Path | None, out: Path | None) -> Path | None:
    """The checkpoint `resume` names; 'auto': OUT/last.safetensors when it exists, else None (start fresh)."""
    from charlm.training import rundir

    if resume is None or str(resume) != "auto":
        return None if resume is None else Path(resume)
    if out is None:
        raise OptionError("--resume auto continues OUT/last.safetensors: give --out too")
    last = out / rundir.LAST
    return last if last.exists() else None


def _resume_config(resumed: checkpoint.Checkpoint, layers: list[dict]) -> tuple[configs.ModelConfig, configs.TrainConfig]:
    """The checkpoint's configuration with the given options over it; options equal to the checkpoint's are fine."""
    saved = {"model": resumed.meta["model"], "train": resumed.meta["train"]}
    saved_model, saved_train = configs.resolve(base=saved)
    kept = {**vars(saved_model), **vars(saved_train)}
    model_cfg, train_cfg = configs.resolve(*layers, base=saved)
    asked = {**vars(model_cfg), **vars(train_cfg)}
    conflicts = [f"--{k.replace('_', '-')} {asked[k]} (the checkpoint has {kept[k]})" for k in FIXED_ON_RESUME if asked[k] != kept[k]]
    if conflicts:
        raise OptionError(
            f"--resume continues the checkpoint's model and random stream, but {'; '.join(conflicts)}: drop "
            f"{'it' if len(conflicts) == 1 else 'them'}, or start a new run from its weights with --init-from"
        )
    return model_cfg, train_cfg


def _recorded_data(ckpt: checkpoint.Checkpoint) -> str:
    """The prepared dir a checkpoint was trained on, when resuming without naming the data.

    The path comes from the file, so it is trusted only as far as it is checked: it must be a
    prepared dir (never a text or a tree to prepare) holding the same source text (sha256).
    """
    from charlm.data import PreparedData

    provenance = ckpt.meta.get("provenance") or {}
    recorded = provenance.get("data_dir")
    retry = f"give the data to continue on: charlm train DATA --resume {ckpt.path}"
    if not isinstance(recorded, str) or not (Path(recorded) / "meta.json").is_file():
        raise DataError(f"{ckpt.path} was trained on {recorded!r}, which is not a prepared data dir here; {retry}")
    if PreparedData(recorded).meta.get("source", {}).get("sha256") != provenance.get("source_sha256"):
        raise DataError(f"{recorded} now holds other data than {ckpt.path} was trained on; {retry}")
    return recorded


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
            data_dir = world.in_turn(lambda: run.prepare_data(  # one writer per cache dir
                encoding=encoding, split=split, tokenizer=tokenizer, vocab_size=vocab_size,
                character_coverage=character_coverage, glob=glob, mirror=mirror, progress=sink))
            return _run(run, PreparedData(data_dir), world, sink, polled, stop, overwrite)
        except Exception as e:
            if world.size == 1:
                raise
            raise _rank_error(world, e) from None
        finally:
            world.close()


def _run(run: RunPlan, data: Any, world: World, sink: Sink | None, polled: _StopPoll, stop: StopArg, overwrite: bool) -> TrainResult:
    """Build the trainer and train; a stop request ends in a result that says so."""
    from charlm.training.trainer import Trainer, TrainingStopped

    reports = _Reports(sink)
    # A stop that is also a context manager (the CLI's signal handlers) is entered for training only:
    # while the data is fetched or prepared, Ctrl-C interrupts at once.
    entered = stop if hasattr(stop, "__enter__") and hasattr(stop, "__exit__") else contextlib.nullcontext()
    with entered:  # type: ignore[attr-defined]
        trainer = Trainer(run.model_cfg, run.train_cfg, data, run.out, resume=run.resumed, init_from=run.init,
                          report=reports, world=world, stop=polled)
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
        out_dir=run.out, last=run.out / "last.safetensors", best=best if best.exists() else None, data_dir=Path(data.dir),
        step=p.step, epoch=p.epoch + p.window / len(trainer.batcher), train_bpc=_finite(reports.train_bpc),
        val_bpc=_finite(reports.val_bpc), best_val_bpc=_finite(p.best_val), elapsed_s=p.elapsed, stopped=stopped, rank=world.rank,
    )


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class _Reports:
    """The trainer's `report(kind, record)`, passed on as Progress; keeps the last figures for the result."""

    def __init__(self, sink: Sink | None):
        self.sink = sink
        self.train_bpc: float | None = None
        self.val_bpc: float | None = None

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "train":
            self.train_bpc = info.get("train_bpc")
        elif kind == "val":
            self.val_bpc = info.get("val_bpc")
        if self.sink is not None:
            self.sink(Progress.of(kind, info))


class _StopPoll:
    """`stop` as the trainer polls it: None, or the reason (a signal's name, what the callable said, or 'request')."""

    def __init__(self, stop: StopArg):
        if stop is not None and not callable(stop) and not hasattr(stop, "is_set"):
            raise OptionError(f"stop must be a callable or a threading.Event (got {stop!r})")
        self.stop = stop
        self.reason: str | None = None

    def __call__(self) -> str | None:
        if self.stop is None:
            return None
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
