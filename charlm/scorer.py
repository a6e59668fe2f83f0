"""The Scorer protocol, and its single-model implementation.

Sampling, beam search and evaluation only ever see a Scorer, so one model and an ensemble of
several are interchangeable.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells import Stepper
from charlm.devices import autocast_for
from charlm.model import CharRNN, State
from charlm.vocab import Vocab


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
            self._stepper = Stepper(self.model, self.dtype)
        return self._stepper

    def start(self, batch_size: int) -> State:
        return self.model.init_state(batch_size)

    @torch.inference_mode()
    def step(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        logits, state = self.stepper(ids, state)  # (B, V)
        return F.log_softmax(logits.float(), dim=-1), state

    @torch.inference_mode()
    def score(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        with autocast_for(self.device, self.dtype):
            logits, state = self.model(ids.to(self.device), state)  # (B, T, V)
        return F.log_softmax(logits.float(), dim=-1), state

    def reorder(self, state: State, index: Tensor) -> State:
        return tuple(s.index_select(1, index) for s in state)
