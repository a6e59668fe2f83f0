"""Loss curves: train and validation bits/char against characters seen, from a run's metrics.jsonl.

matplotlib is optional (`pip install matplotlib`, or the `plot` extra): it is imported only when a
plot is drawn, so the rest of charlm never needs it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from charlm.errors import CharlmError

METRICS = "metrics.jsonl"
SERIES = {"train": "train_bpc", "val": "val_bpc"}  # record kind -> the bits/char field it carries


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{'train': [(chars_seen, bpc), ...], 'val': [...]} from RUN_DIR/metrics.jsonl, in step order.

    A step logged twice (a run resumed from an earlier checkpoint repeats the steps after it) is
    drawn from its later record, the one the run continued from.
    """
    path = Path(run_dir) / METRICS
    if not Path(run_dir).is_dir():
        raise CharlmError(f"{run_dir} is not a directory (give the --out dir of a charlm train run)")
    if not path.is_file():
        raise CharlmError(f"{run_dir} has no {METRICS} (give the --out dir of a charlm train run)")
    by_step: dict[str, dict[int, tuple[int, float]]] = {kind: {} for kind in SERIES}
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn line (resume cuts it, but an older charlm did not):
            # skip it. A file whose first line is not JSON at all is something else.
            if number == 1 and not line.startswith("{"):
                raise CharlmError(f"{path} line {number} is not JSON; is it a charlm metrics file?") from None
            continue
        if not isinstance(record, dict):
            continue
        field = SERIES.get(record.get("kind"))
        value = record.get(field) if field else None
        if isinstance(value, (int, float)) and math.isfinite(value) and "chars_seen" in record:
            by_step[record["kind"]][int(record.get("step", 0))] = (int(record["chars_seen"]), float(value))
    curves = {kind: [points[s] for s in sorted(points)] for kind, points in by_step.items()}
    if not any(curves.values()):
        raise CharlmError(f"{path} has no train or val bits/char records to plot yet")
    return curves


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw RUN_DIR's loss curves to a PNG (default RUN_DIR/loss.png); return its path."""
    curves = read_curves(run_dir)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise CharlmError("charlm plot needs matplotlib: pip install matplotlib (or pip install 'charlm[plot]')") from None
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    if out.suffix.lower() != ".png":
        raise CharlmError(f"the plot is written as PNG: give a file name ending in .png (got {out})")

    # A bare Figure on the Agg canvas: no pyplot, so no global state and no display needed.
    fig = Figure(figsize=(8, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train, val = curves["train"], curves["val"]
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=1.2, alpha=0.85, label="train")
    if val:
        best_chars, best = min(val, key=lambda p: p[1])
        ax.plot(
            *zip(*val),
            color="tab:orange",
            linewidth=1.8,
            marker="o",
            markersize=3.5,
            label=f"validation (best {best:.4f} at {EngFormatter(places=1)(best_chars)} chars)",
        )
    ax.set_title(f"{Path(run_dir).resolve().name}: bits per character")
    ax.set_xlabel("characters seen")
    ax.set_ylabel("bits per character")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
