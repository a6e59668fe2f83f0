"""Training progress on stderr: a rich live bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table


def _fmt_bpc(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _fmt_eta(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def config_table(info: dict) -> Table:
    table = Table(title="charlm train", show_header=False, box=None, pad_edge=False)
    for section, values in info["config"].items():
        table.add_row(f"[bold]{section}[/]", " ".join(f"{k}={v}" for k, v in values.items()))
    table.add_row("[bold]run[/]", f"{info['parameters']:,} parameters on {info['device']}; "
                  f"{info['steps_per_epoch']:,} steps/epoch; data {info['data']}; out {info['out_dir']}")
    if info["resumed_at"]:
        table.add_row("[bold]resume[/]", f"continuing from step {info['resumed_at']:,}")
    return table


class TrainDisplay:
    """The `report` callback of a Trainer."""

    def __init__(self, console: Console | None = None, plain_every: float = 15.0):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.plain_every = plain_every
        self._last_plain = 0.0
        self.val = None
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, kind: str, info: dict) -> None:
        getattr(self, f"on_{kind}")(info)

    def on_start(self, info: dict) -> None:
        self.console.print(config_table(info))
        if self.live:
            self.progress = Progress(
                TextColumn("step {task.fields[step]:>7,}"),
                BarColumn(),
                TextColumn("epoch {task.fields[epoch]:.2f}  train {task.fields[train]}  val {task.fields[val]} bits/char"),
                TextColumn("{task.fields[rate]:>8,.0f} chars/s  ETA {task.fields[eta]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=1.0, step=info["resumed_at"], epoch=0.0,
                                               train="-", val="-", rate=0.0, eta="-")

    def on_train(self, r: dict) -> None:
        if self.progress is not None:
            done = None
            if r.get("eta_s") is not None and r["elapsed_s"] + r["eta_s"] > 0:
                done = r["elapsed_s"] / (r["elapsed_s"] + r["eta_s"])
            self.progress.update(self.task, completed=done, step=r["step"], epoch=r["epoch"],
                                 train=_fmt_bpc(r["train_bpc"]), val=_fmt_bpc(self.val),
                                 rate=r["chars_per_s"], eta=_fmt_eta(r.get("eta_s")))
        elif time.monotonic() - self._last_plain >= self.plain_every:
            self._last_plain = time.monotonic()
            self.console.print(
                f"step {r['step']:,}  epoch {r['epoch']:.2f}  train {_fmt_bpc(r['train_bpc'])} bits/char  "
                f"{r['chars_per_s']:,.0f} chars/s  ETA {_fmt_eta(r.get('eta_s'))}", soft_wrap=True)

    def on_val(self, r: dict) -> None:
        self.val = r["val_bpc"]
        line = f"step {r['step']:,}  val {_fmt_bpc(r['val_bpc'])} bits/char (best {_fmt_bpc(r['best_val_bpc'])})"
        if self.progress is not None:
            self.progress.update(self.task, val=_fmt_bpc(self.val))
            self.progress.console.print(line, soft_wrap=True)
        else:
            self.console.print(line, soft_wrap=True)

    def on_saved(self, info: dict) -> None:
        pass

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
