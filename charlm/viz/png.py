"""The gate-saturation scatter as a PNG (the paper's Figure 3): one panel per gate, one colour per layer.

matplotlib is optional, as for `charlm plot`: imported only when this PNG is drawn.
"""

from __future__ import annotations

from pathlib import Path

from charlm.errors import CharlmError

LAYER_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def gate_scatter(stats: dict[str, dict], out: Path, title: str) -> Path:
    """Draw gates.saturation's numbers to `out` (.png); return its path."""
    if not stats:
        raise CharlmError("--png draws gate saturation, and this cell has no gates (see: charlm info CKPT)")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise CharlmError(f"--png writes a PNG: give a file name ending in .png (got {out})")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CharlmError("--png needs matplotlib: pip install matplotlib (or pip install 'charlm[plot]')") from None
    # A bare Figure on the Agg canvas: no pyplot, so no global state and no display needed.
    fig = Figure(figsize=(3.2 * len(stats), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(stats), squeeze=False)[0]
    for ax, (name, s) in zip(axes, stats.items()):
        for k, (left, right) in enumerate(zip(s["left"], s["right"])):
            ax.scatter(left, right, s=7, alpha=0.5, color=LAYER_COLOURS[k % len(LAYER_COLOURS)], label=f"layer {k}", linewidths=0)
        ax.plot([0, 1], [1, 0], color="#ccc", linewidth=0.8, zorder=0)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=name.replace("_", " "), xlabel="fraction left-saturated (< 0.1)")
        ax.set_aspect("equal")
    axes[0].set_ylabel("fraction right-saturated (> 0.9)")
    axes[-1].legend(loc="upper right", fontsize=8, markerscale=2)
    fig.suptitle(title, fontsize=10)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as e:
        raise CharlmError(f"cannot write {out}: {e.strerror or e}") from None
    return out
