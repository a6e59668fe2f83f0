"""Progress of prepare and train: the record a `progress` callable receives, and the default display.

    charlm.train("input.txt", "run", max_steps=500, progress=lambda p: print(p.step, p.train_bpc))

The default display (progress=True) is a rich live bar on a terminal and in Jupyter (with
ipywidgets), and a plain line every 15 s elsewhere (a log file, CI). It writes to stderr only when
asked to: progress=False prints nothing.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from charlm.terminal import PipeConsole

PREPARE_BAR_BYTES = 32 << 20  # smaller inputs are prepared in a second or two: no bar


@dataclass(frozen=True)
class Progress:
    """One progress report of prepare or train.

    kind: "prepare" (a pass over the text: `phase`, bytes `done` of `total`), "start" (the resolved
    configuration, parameters, device and data, in `info`), "train" (every log_every steps:
    train_bpc, lr, chars_per_s, eta_s), "val" (every eval_every steps: val_bpc, best_val_bpc) or
    "saved" (a checkpoint was written). Figures a kind does not carry are None.
    """

    kind: str
    step: int | None = None  # optimizer steps taken
    epoch: float | None = None  # passes over the training split, fractional
    train_bpc: float | None = None  # bits per character over the last log_every steps
    val_bpc: float | None = None
    best_val_bpc: float | None = None
    lr: float | None = None
    chars_per_s: float | None = None
    eta_s: float | None = None  # seconds left, when there is a limit
    elapsed_s: float | None = None  # seconds of training, across resumes
    phase: str | None = None  # prepare: which pass over the text
    done: int | None = None  # prepare: bytes done
    total: int | None = None  # prepare: bytes in all
    info: dict[str, Any] = field(default_factory=dict)  # the whole record, as metrics.jsonl has it

    @classmethod
    def of(cls, kind: str, info: dict[str, Any]) -> Progress:
        """A trainer's report (its kind and record) as a Progress."""
        names = ("step", "epoch", "train_bpc", "val_bpc", "best_val_bpc", "lr", "chars_per_s", "eta_s", "elapsed_s")
        picked = {name: info[name] for name in names if name in info}
        if kind == "start":
            picked["step"] = info.get("resumed_at", 0)
        return cls(kind=kind, **picked, info=dict(info))


def _fmt_bpc(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def config_table(info: dict[str, Any]) -> Table:
    """The resolved configuration and the run's facts, as printed when training starts."""
    table = Table(title="charlm train", show_header=False, box=None, pad_edge=False)
    for section, values in info["config"].items():
        table.add_row(f"[bold]{section}[/]", " ".join(f"{k}={v}" for k, v in values.items()))
    table.add_row(
        "[bold]run[/]",
        f"{info['parameters']:,} parameters on {info['device']}; "
        f"{info['steps_per_epoch']:,} steps/epoch; data {info['data']}; out {info['out_dir']}",
    )
    if info["resumed_at"]:
        table.add_row("[bold]resume[/]", f"continuing from step {info['resumed_at']:,}")
    return table


class ProgressDisplay:
    """The default `progress` of prepare and train: call it with each Progress; `close()` at the end."""

    def __init__(self, console: Console | None = None, plain_every: float = 15.0):
        self.console = console or PipeConsole(stderr=True)  # a closed pipe raises BrokenPipeError: train stops and saves
        # Jupyter draws rich's live bars through ipywidgets; without it, plain lines.
        self.live = self.console.is_terminal or (self.console.is_jupyter and importlib.util.find_spec("ipywidgets") is not None)
        self.plain_every = plain_every
        self._last_plain = 0.0
        self.val: float | None = None
        self.bar: RichProgress | None = None  # training
        self.task: Any = None
        self.prepare_bar: RichProgress | None = None
        self.prepare_tasks: dict[str, Any] = {}

    def __call__(self, p: Progress) -> None:
        getattr(self, f"on_{p.kind}", lambda p: None)(p)

    def on_prepare(self, p: Progress) -> None:
        if self.prepare_bar is None:
            self.prepare_bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=self.console,
                transient=True,
                disable=(p.total or 0) < PREPARE_BAR_BYTES or not self.live,
            )
            self.prepare_bar.start()
        phase = p.phase or ""
        if phase not in self.prepare_tasks:
            self.prepare_tasks[phase] = self.prepare_bar.add_task(phase, total=p.total)
        self.prepare_bar.update(self.prepare_tasks[phase], completed=p.done)

    def on_start(self, p: Progress) -> None:
        self._close_prepare()
        self.console.print(config_table(p.info))
        if self.live:
            self.bar = RichProgress(
                TextColumn("step {task.fields[step]:>7,}"),
                BarColumn(),
                TextColumn("epoch {task.fields[epoch]:.2f}  train {task.fields[train]}  val {task.fields[val]} bits/char"),
                TextColumn("{task.fields[rate]:>8,.0f} chars/s  ETA {task.fields[eta]}"),
                console=self.console,
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=1.0, step=p.step, epoch=0.0, train="-", val="-", rate=0.0, eta="-")

    def on_train(self, p: Progress) -> None:
        if self.bar is not None:
            done = None
            elapsed = p.elapsed_s or 0.0
            if p.eta_s is not None and elapsed + p.eta_s > 0:
                done = elapsed / (elapsed + p.eta_s)
            self.bar.update(
                self.task,
                completed=done,
                step=p.step,
                epoch=p.epoch,
                train=_fmt_bpc(p.train_bpc),
                val=_fmt_bpc(self.val),
                rate=p.chars_per_s,
                eta=_fmt_eta(p.eta_s),
            )
        elif time.monotonic() - self._last_plain >= self.plain_every:
            self._last_plain = time.monotonic()
            self.console.print(
                f"step {p.step:,}  epoch {p.epoch:.2f}  train {_fmt_bpc(p.train_bpc)} bits/char  "
                f"{p.chars_per_s:,.0f} chars/s  ETA {_fmt_eta(p.eta_s)}",
                soft_wrap=True,
            )

    def on_val(self, p: Progress) -> None:
        self.val = p.val_bpc
        line = f"step {p.step:,}  val {_fmt_bpc(p.val_bpc)} bits/char (best {_fmt_bpc(p.best_val_bpc)})"
        if self.bar is not None:
            self.bar.update(self.task, val=_fmt_bpc(self.val))
            self.bar.console.print(line, soft_wrap=True)
        else:
            self.console.print(line, soft_wrap=True)

    def _close_prepare(self) -> None:
        if self.prepare_bar is not None:
            self.prepare_bar.stop()
            self.prepare_bar = None
            self.prepare_tasks.clear()

    def close(self) -> None:
        """Stop the live bars (the last state of the training bar stays on screen); a closed output is no error here."""
        try:
            self._close_prepare()
            if self.bar is not None:
                self.bar.stop()
        except BrokenPipeError:
            pass
        self.bar = None


Sink = Callable[[Progress], None]


def prepare_reporter(sink: Sink | None) -> Callable[[str, int, int], None] | None:
    """prepare's progress callable (phase, bytes done, bytes total) that passes each report on to `sink` as a Progress."""
    if sink is None:
        return None
    return lambda phase, done, total: sink(Progress(kind="prepare", phase=phase, done=done, total=total))
