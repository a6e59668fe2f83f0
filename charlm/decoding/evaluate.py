"""Bits per character (and perplexity) of a Scorer over a token stream.

Figures are per character of the raw text whatever the unit, so a SentencePiece model and a
character model are on one scale: total NLL over the scored tokens divided by the number of
characters those tokens spell (counted on the text, not estimated from the tokens).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from charlm.data import eval_windows
from charlm.decoding.scorer import Scorer


def bits_per_char(nll: float, chars: float) -> float:
    """Total negative log-likelihood in nats over the characters it covers -> bits per character: every figure charlm reports."""
    return nll / math.log(2) / chars if chars else math.nan


@torch.inference_mode()
def evaluate(scorer: Scorer, tokens: np.ndarray, chars_per_token: float = 1.0, streams: int = 1, window: int = 512,
             chars: int | None = None, record: list | None = None) -> dict:
    """Score every token after the first given the ones before it, the state carried through.

    streams=1 scores the text as one stream (exact); more streams cut it into that many rows
    scored side by side (faster; each row's first token has no context). `chars`: the characters
    the scored tokens spell (see scored_chars); without it, scored tokens x chars_per_token.
    """
    nll = 0.0
    n = 0
    state = scorer.start(streams)
    for x, y in eval_windows(tokens, streams, window):
        logp, state = scorer.score(x, state)  # (B, T, V)
        token_logp = logp.gather(-1, y.unsqueeze(-1).to(logp.device)).squeeze(-1)  # (B, T)
        nll -= float(token_logp.sum())
        if record is not None:
            record.append(token_logp.cpu())
        n += y.numel()
    if n == 0:
        return {"bits_per_char": float("nan"), "perplexity": float("nan"), "chars": 0, "tokens": 0, "nll": 0.0,
                "bits_per_token": float("nan")}
    if chars is None:
        chars = n * chars_per_token
    bpc = bits_per_char(nll, chars)
    return {
        "bits_per_char": bpc,
        "perplexity": 2.0**bpc,  # per character
        "chars": int(round(chars)),
        "tokens": n,
        "nll": nll,
        "bits_per_token": bits_per_char(nll, n),  # the same formula, per token
    }


def scored_chars(vocab, tokens: np.ndarray, text_chars: int) -> int:
    """The characters the tokens scored with one stream spell: the text's, less those of the first token (the context).

    A character vocabulary has one token per character (a byte, for a byte vocabulary). A
    SentencePiece piece spells several, or part of one (a byte piece): only the first token's
    complete characters are left out.
    """
    if len(tokens) < 2:
        return 0
    if vocab.kind != "spm":
        return text_chars - 1
    return text_chars - len(vocab.stream_decoder()(int(tokens[0])))
