"""What the API's calls return: a Score (a text's figures), a Beam (one beam-search result), and the
checks and conversions of those figures; and checkpoint_info, what a checkpoint file holds."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from charlm import checkpoint
from charlm.decoding.evaluate import bits_per_char
from charlm.errors import CharlmError


@dataclass(frozen=True)
class Score:
    """How well a model predicts a text: the figures of `charlm eval`, per character of the text.

    logprobs: each scored token's log-probability (natural log), in order (the first token is the
    context, not scored). members: an ensemble's members' own figures. dynamic: the settings of a
    dynamic evaluation (update, lr, decay, window, note), None for a static one.
    """

    bits_per_char: float
    perplexity: float  # per character: 2 ** bits_per_char
    chars: int  # characters scored
    tokens: int  # tokens scored
    nll: float  # total negative log-likelihood, nats
    bits_per_token: float
    seconds: float  # time spent scoring
    logprobs: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    members: list[Score] = field(default_factory=list)
    dynamic: dict[str, Any] | None = None

    @property
    def chars_per_s(self) -> float:
        return self.chars / max(self.seconds, 1e-9)

    def figures(self, speed: bool = False) -> dict[str, Any]:
        """The record `charlm eval --json` prints: bits_per_token only where tokens are not characters."""
        record: dict[str, Any] = {
            "bits_per_char": self.bits_per_char,
            "perplexity": self.perplexity,
            "chars": self.chars,
            "tokens": self.tokens,
            "nll": self.nll,
        }
        if self.tokens != self.chars:
            record["bits_per_token"] = self.bits_per_token
        if speed:
            record["chars_per_s"] = self.chars_per_s
        return record


class Beam(NamedTuple):
    """One beam-search result: the continuation (without the prime) and its total log-probability (nats)."""

    text: str
    logprob: float
    tokens: int  # symbols generated

    @property
    def bits_per_char(self) -> float:
        return bits_per_char(-self.logprob, max(len(self.text), 1))


def from_record(r: dict) -> Score:
    return Score(
        r["bits_per_char"],
        r["perplexity"],
        r["chars"],
        r["tokens"],
        r["nll"],
        r["bits_per_token"],
        r["chars"] / max(r["chars_per_s"], 1e-30) if r.get("chars_per_s") else 0.0,
    )


def check_finite(score: Score, paths: list[Path], hint: str) -> None:
    """A figure that is not finite means weights that overflow float32 on this text: an error, never a NaN figure."""
    named = [(str(p), m) for p, m in zip(paths, score.members)] + [("the model", score)]
    for label, s in named:
        if not math.isfinite(s.bits_per_char):
            raise CharlmError(
                f"{label} gives a non-finite figure ({s.bits_per_char} bits/char): "
                f"its weights overflow float32 on this text{hint}"
            )


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint file holds, read and checked as a stranger's file (no model is built): its
    metadata, vocabulary, checksum status, whether it is resumable, and its tensor and parameter counts."""
    c = checkpoint.load(path)
    return {
        "path": c.path,
        "meta": copy.deepcopy(c.meta),
        "vocab": c.vocab,
        "checksum": c.checksum,
        "resumable": c.has_train_state,
        "tensors": len(c.tensors),
        "parameters": sum(t.numel() for t in c.model_state().values()),
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
    }
