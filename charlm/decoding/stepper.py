"""One decoding step of one model, or of several models stepped together (an ensemble's members).

The cell's own decoder (cells/NAME.py, through the contract in cells/base.py) turns ids and the
carried state into the top layer's output; the head's product and bias are added here, per
member. A single model is M = 1: the same code path, so the kernels exist once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells import State
from charlm.cells.products import affine, products
from charlm.model import CharRNN


class Stepper:
    """ids (B,) and a state of (M, L, B, H) tensors -> logits (M, B, V) and the new state, for M models
    whose cells are of one class and shape (`can_stack`)."""

    @torch.no_grad()
    def __init__(self, models: list[CharRNN], dtype: str = "fp32"):
        cells = [m.rnn for m in models]
        self.cell_step = type(cells[0]).decoder(cells, [m.embed.weight.detach() for m in models], dtype)
        self.w_head = products([m.head.weight for m in models], dtype)  # (B, H) -> (B, V) each
        self.b_head = torch.stack([m.head.bias.detach() for m in models]).unsqueeze(1)  # (M, 1, V)

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        x, state = self.cell_step(ids, state)  # (M, B, H)
        return affine(self.b_head, self.w_head, x), state  # (M, B, V)


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
        logits, new = self.stepper(ids.to(self.device), stacked)
        logps = F.log_softmax(logits.float(), dim=-1)
        return logps, tuple(tuple(t[m] for t in new) for m in range(self.count))
