"""Bits per character (and perplexity) of a Scorer over a token stream."""

from __future__ import annotations

import math

import numpy as np
import torch

from charlm.data import eval_windows
from charlm.scorer import Scorer


@torch.inference_mode()
def evaluate(scorer: Scorer, tokens: np.ndarray, chars_per_token: float = 1.0, streams: int = 1, window: int = 512) -> dict:
    """Score every token after the first given the ones before it, the state carried through.

    streams=1 scores the text as one stream (exact); more streams cut it into that many rows
    scored side by side (faster; each row's first token has no context).
    """
    nll = 0.0
    n = 0
    state = scorer.start(streams)
    for x, y in eval_windows(tokens, streams, window):
        logp, state = scorer.score(x, state)  # (B, T, V)
        nll -= float(logp.gather(-1, y.unsqueeze(-1).to(logp.device)).sum())
        n += y.numel()
    if n == 0:
        return {"bits_per_char": float("nan"), "perplexity": float("nan"), "chars": 0, "tokens": 0, "nll": 0.0}
    chars = n * chars_per_token
    bpc = nll / math.log(2) / chars
    return {
        "bits_per_char": bpc,
        "perplexity": 2.0**bpc,  # per character
        "chars": int(round(chars)),
        "tokens": n,
        "nll": nll,
    }
