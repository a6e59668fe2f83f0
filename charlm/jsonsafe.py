"""JSON that every reader accepts: JSON has no words for NaN or Infinity, so they are written as null
(metadata) or refused (figures a command prints)."""

from __future__ import annotations

import json
import math

from charlm.errors import CharlmError


def finite_or_null(value):
    """value with every non-finite float (at any depth of dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(payload, **kwargs) -> str:
    """Strict JSON (no NaN or Infinity); a figure that is not finite is an error, never a bare NaN."""
    try:
        return json.dumps(payload, allow_nan=False, **kwargs)
    except ValueError:
        raise CharlmError("a figure is not a finite number (NaN or infinite): the model's outputs overflow") from None
