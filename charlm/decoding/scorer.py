"""The Scorer protocol, and its single-model implementation.

Sampling, beam search and evaluation only ever see a Scorer, so one model and an ensemble of
several are interchangeable.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells.native import MAX_ROWS
from charlm.decoding.stepper import StackedModels, Stepper, can_stack
from charlm.devices import autocast_for
from charlm.model import CharRNN, State
from charlm.tokenizers.vocab import Vocab


class Scorer(Protocol):
    vocab: Vocab

    def start(self, batch_size: int) -> State:
        """A fresh recurrent state for batch_size streams."""

    def step(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,) -> next-symbol log-probs (B, V) and the new state."""

    def score(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B, T) in one forward call -> log-probs (B, T, V) after each position, and the state."""

    def reorder(self, state: State, index: Tensor) -> State:
        """Gather streams: row i of the result is row index[i] of state (beam search)."""


PRIME_CHUNK = 4096  # tokens per forward call: bounds the (B, T, V) log-probs of a long prime, not its length


def run_prime(scorer: Scorer, ids: Tensor, batch_size: int = 1, chunk: int = PRIME_CHUNK) -> tuple[Tensor, State]:
    """A known text (1-D ids) through the whole-window forward pass in chunks, the state carried: the
    log-probs after its last symbol (B, V) and the state, for batch_size copies. Memory is bounded by
    the chunk, whatever the prime's length (a 10 MB prime costs what 4,096 symbols cost)."""
    state = scorer.start(batch_size)
    logp = None
    for begin in range(0, len(ids), chunk):
        part = ids[begin : begin + chunk].view(1, -1).expand(batch_size, -1)
        logp, state = scorer.score(part, state)
        logp = logp[:, -1]  # only the last position's distribution is kept
    if logp is None:
        raise ValueError("run_prime needs at least one id")
    return logp, state


class ModelScorer:
    """One trained CharRNN behind the Scorer protocol."""

    def __init__(self, model: CharRNN, vocab: Vocab, dtype: str = "fp32"):
        self.model = model.eval()
        self.vocab = vocab
        self.dtype = dtype
        self.device = model.head.weight.device
        self._stepper: Stepper | None = None

    @property
    def stepper(self) -> Stepper:
        if self._stepper is None:  # built lazily: evaluation never needs it
            self._stepper = Stepper([self.model], self.dtype)
        return self._stepper

    def start(self, batch_size: int) -> State:
        return self.model.init_state(batch_size)

    def step(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        native = (self._stepper or self.stepper).native
        if native is not None and ids.shape[0] <= MAX_ROWS:  # one call, the state as it is (L, B, H); no autograd to turn off
            return native.run(ids, state, (ids.shape[0], native.vocab), True)
        with torch.inference_mode():
            logp, state = self.stepper(ids.to(self.device), tuple(s.unsqueeze(0) for s in state), log_probs=True)  # (1, B, V)
        return logp[0], tuple(s[0] for s in state)

    @torch.inference_mode()
    def score(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        with autocast_for(self.device, self.dtype):
            logits, state = self.model(ids.to(self.device), state)  # (B, T, V)
        return F.log_softmax(logits.float(), dim=-1), state

    def reorder(self, state: State, index: Tensor) -> State:
        return tuple(s.index_select(1, index.to(s.device)) for s in state)

    @staticmethod
    def stacked(members: list) -> StackedModels | None:
        """The members stepped as one (see stepper.py), when they are all ModelScorers whose models
        can be (cells of one class and shape, one dtype, one device); else None."""
        if len(members) < 2 or not all(isinstance(m, ModelScorer) for m in members):
            return None
        models = [m.model for m in members]
        if len({m.dtype for m in members}) != 1 or not can_stack(models):
            return None
        return StackedModels(models, members[0].dtype, members[0].device)
