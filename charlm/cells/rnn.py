"""Vanilla RNN (Elman 1990) with tanh, as PyTorch defines it:

    h' = tanh(W_ih x + b_ih + W_hh h + b_hh)

Training runs nn.RNN's fused kernel; decoding runs RNNDecoder's packed products.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from charlm.cells.base import State, register
from charlm.cells.fused import FusedCell
from charlm.cells.native import NativeSpec
from charlm.cells.products import add_products, affine, products


@register
class RNN(FusedCell, nn.RNN):
    name = "rnn"
    description = "vanilla tanh RNN (PyTorch's nn.RNN)"
    state_names = ("h",)
    gate_names = ()
    fused_module = nn.RNN

    def layer_step(self, k: int, x: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        w_ih, w_hh, b_ih, b_hh = self.weights(k)
        h = (x @ w_ih.t() + b_ih + state[0] @ w_hh.t() + b_hh).tanh()
        return h, (h,), {"hidden": h}

    @classmethod
    def decoder(cls, cells: list["RNN"], embeddings: list[Tensor], dtype: str = "fp32") -> "RNNDecoder":
        return RNNDecoder(cells, embeddings, dtype)

    def native_spec(self, embedding: Tensor) -> NativeSpec:
        """This model's step for the native library (cells/native.py)."""
        w = [self.weights(k) for k in range(self.num_layers)]  # (w_ih, w_hh, b_ih, b_hh)
        rest = range(1, self.num_layers)
        return NativeSpec(
            self.name,
            1,
            embedding @ w[0][0].t() + w[0][2] + w[0][3],
            rec=[w[0][1]] + [None for _ in rest],
            inp=[None] + [torch.cat([w[k][0], w[k][1]], dim=1) for k in rest],
            bias=[None] + [w[k][2] + w[k][3] for k in rest],
        )


class RNNDecoder:
    """One step of M tanh RNNs of one shape: a table for layer 0's input, one product of the stacked [x, h] above it."""

    @torch.no_grad()
    def __init__(self, cells: list[RNN], embeddings: list[Tensor], dtype: str = "fp32"):
        self.layers = cells[0].num_layers
        w = [[c.weights(k) for k in range(self.layers)] for c in cells]
        self.table0 = torch.stack([e @ wm[0][0].t() + wm[0][2] + wm[0][3] for e, wm in zip(embeddings, w)])  # (M, V, H)
        self.w_hh0 = products([wm[0][1] for wm in w], dtype)
        self.w_cat = [None] + [
            products([torch.cat([wm[k][0], wm[k][1]], dim=1) for wm in w], dtype) for k in range(1, self.layers)
        ]
        self.b = [None] + [torch.stack([wm[k][2] + wm[k][3] for wm in w]).unsqueeze(1) for k in range(1, self.layers)]

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        (h,) = state
        h_all = torch.empty_like(h)
        x = None
        for k in range(self.layers):
            if k == 0:
                pre = add_products(self.table0[:, ids], self.w_hh0, h[:, 0])
            else:
                pre = affine(self.b[k], self.w_cat[k], torch.cat([x, h[:, k]], dim=2))
            x = torch.tanh(pre, out=h_all[:, k])
        return x, (h_all,)
