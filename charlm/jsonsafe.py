"""JSON that every reader accepts: JSON has no words for NaN or Infinity, so they are written as null."""

from __future__ import annotations

import math


def finite_or_null(value):
    """value with every non-finite float (at any depth of dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value
