"""The decoding options' choices and defaults, importable without torch (the CLI's help text needs them)."""

from __future__ import annotations

import math

from charlm.errors import OptionError

COMBINE_RULES = ("mean", "geometric")  # ensemble rules: charlm/decoding/ensemble.py
UNKNOWN_RULES = ("error", "skip")  # characters outside a char vocabulary: refuse the text, or drop them
DYN_UPDATES = ("auto", "rms", "sgd")  # dynamic evaluation's update rules: charlm/decoding/dynamic.py
# Dynamic evaluation's defaults per rule (lr, decay), chosen by measurement (docs/results.md, benchmarks/dynamic_eval.py).
DYN_DEFAULTS = {"rms": (1.5e-4, 0.0), "sgd": (0.1, 0.0)}
MAX_DYN_WINDOW = 1 << 20


def check_dynamic_options(update: str, lr: float | None, decay: float | None, window: int | None) -> None:
    """Dynamic evaluation's flags, each in its own range, before anything is loaded."""
    if update not in DYN_UPDATES:
        raise OptionError(f"--dyn-update must be one of {', '.join(DYN_UPDATES)} (got {update!r})")
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise OptionError(f"--dyn-lr must be a finite number >= 0 (got {lr}); 0 leaves the model as trained")
    if decay is not None and not (math.isfinite(decay) and 0 <= decay <= 1):
        raise OptionError(
            f"--dyn-decay must be in [0, 1]: the share of the way back to the trained weights per window (got {decay})"
        )
    if window is not None and not 1 <= window <= MAX_DYN_WINDOW:
        raise OptionError(f"--dyn-window must be between 1 and {MAX_DYN_WINDOW} (got {window})")


def check_unknown(unknown: str) -> None:
    """--unknown (the API's unknown=): one of UNKNOWN_RULES."""
    if unknown not in UNKNOWN_RULES:
        raise OptionError(f"--unknown must be error or skip (got {unknown!r})")
