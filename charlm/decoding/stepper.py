"""One decoding step of one model, or of several models stepped together (an ensemble's members).

Two implementations of one step, chosen per call by the number of rows:

- up to native.MAX_ROWS rows (one stream, a small beam) on the CPU: the native library
  (cells/native.py), the whole step (every layer, the head, the log-softmax) in one call;
- otherwise (many streams, a GPU, or no C compiler): the cell's own decoder (cells/NAME.py, through
  the contract in cells/base.py) turns ids and the carried state into the top layer's output, and the
  head's product and bias are added here, per member; built on first use.

A single model is M = 1: the same code path, so the kernels exist once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells import State
from charlm.cells.native import MAX_ROWS, native_step
from charlm.cells.products import affine, products
from charlm.model import CharRNN


class Stepper:
    """ids (B,) and a state of (M, L, B, H) tensors -> logits (M, B, V) and the new state, for M models
    whose cells are of one class and shape (`can_stack`)."""

    @torch.no_grad()
    def __init__(self, models: list[CharRNN], dtype: str = "fp32"):
        self.models, self.dtype = models, dtype
        self.native = native_step(
            [m.rnn for m in models], [m.embed.weight for m in models], [(m.head.weight, m.head.bias) for m in models], dtype
        )
        self._cell_step: Any = None  # the PyTorch path's parts, built on first use
        self._w_head: list | None = None
        self._b_head: Tensor | None = None

    @torch.no_grad()
    def _build(self) -> None:
        models = self.models
        cells = [m.rnn for m in models]
        self._cell_step = type(cells[0]).decoder(cells, [m.embed.weight.detach() for m in models], self.dtype)
        self._w_head = products([m.head.weight for m in models], self.dtype)  # (B, H) -> (B, V) each
        self._b_head = torch.stack([m.head.bias.detach() for m in models]).unsqueeze(1)  # (M, 1, V)

    @property
    def cell_step(self):
        """The cell's batched decoder (cells/NAME.py), built on first use."""
        if self._cell_step is None:
            self._build()
        return self._cell_step

    @property
    def w_head(self) -> list:
        if self._w_head is None:
            self._build()
        assert self._w_head is not None
        return self._w_head

    def __call__(self, ids: Tensor, state: State, log_probs: bool = False) -> tuple[Tensor, State]:
        """log_probs: return log-softmax of the logits (fp32) instead of the logits."""
        if self.native is not None and ids.shape[0] <= MAX_ROWS:
            return self.native(ids, state, log_probs)
        x, state = self.cell_step(ids, state)  # (M, B, H)
        assert self._b_head is not None
        logits = affine(self._b_head, self.w_head, x)  # (M, B, V)
        return (F.log_softmax(logits.float(), dim=-1) if log_probs else logits), state


def can_stack(models: list[CharRNN]) -> bool:
    """Whether one Stepper can step these models together: cells of one class and shape, heads of one size, one device."""
    keys = {(m.rnn.shape_key(), tuple(m.head.weight.shape), m.head.weight.device) for m in models}
    return len(keys) == 1


class StackedModels:
    """Several models' single steps as one Stepper call: every pointwise operation once for all of them."""

    def __init__(self, models: list[CharRNN], dtype: str, device: torch.device):
        self.stepper, self.device, self.count = Stepper(models, dtype), device, len(models)

    @torch.inference_mode()
    def step(self, ids: Tensor, states: tuple[State, ...]) -> tuple[Tensor, tuple[State, ...]]:
        """ids (B,), one state per member -> log-probs (M, B, V), one new state per member."""
        stacked = tuple(torch.stack(parts) for parts in zip(*states))  # (M, L, B, H) per state tensor
        logps, new = self.stepper(ids.to(self.device), stacked, log_probs=True)
        return logps, tuple(tuple(t[m] for t in new) for m in range(self.count))
