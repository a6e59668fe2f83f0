"""Where the model is unsure: the spans of text it found most surprising (highest mean bits per character)."""

from __future__ import annotations

import numpy as np


def spans(text: str, bits: np.ndarray, width: int = 24, count: int = 10) -> list[dict]:
    """The `count` non-overlapping windows of `width` characters with the most bits per character, worst first."""
    b = np.nan_to_num(np.asarray(bits, dtype=np.float64), nan=0.0)
    width = max(1, min(width, len(b)))
    sums = np.convolve(b, np.ones(width), mode="valid")  # sums[i]: bits of text[i : i + width]
    taken = np.zeros(len(b), dtype=bool)
    out = []
    for i in np.argsort(-sums, kind="stable"):
        if len(out) == count:
            break
        if taken[i : i + width].any():
            continue
        taken[i : i + width] = True
        out.append(
            {
                "start": int(i),
                "end": int(i + width),
                "text": text[i : i + width],
                "bits_per_char": round(float(sums[i] / width), 3),
            }
        )
    return out
