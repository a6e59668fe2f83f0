"""What minGRU and minLSTM share (Feng et al. 2024, "Were RNNs All We Needed?").

Their gates and candidate read the input alone, never the previous state, so each layer is one
product over the whole window, then the linear recurrence h_t = a_t * h_{t-1} + b_t (cells/scan.py),
then nothing: no recurrent matrix, no sequential product. A cell says how its product becomes a
and b (`coefficients`, and `log_coefficients` for the parallel scan); the rest is here.

Stacking (layers above the first): the layer's input is added to its output (a residual
connection). A minimal cell's output is a gated running average of its candidates: without the
residual a deep stack has to pass every feature through each layer's averaging; with it, each layer
adds to what the one below computed, as in the paper's deep models. No normalisation layer: with
2 or 3 layers the outputs stay at the inputs' scale (h is a convex mix of candidates of the size
of the product), and a LayerNorm per step would cost as much as the scan on this CPU. The choice and
its measurement: docs/results.md (cell table).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from charlm.cells.base import Cell, State
from charlm.cells.native import NativeSpec
from charlm.cells.products import affine, products
from charlm.cells.scan import log_scan, pick_scan, sequential_scan


class MinimalCell(Cell):
    """A stack of minimal recurrent layers; subclasses give the coefficients of their recurrence."""

    blocks: ClassVar[int] = 2  # the product's output blocks (gates and candidate), each H wide
    scan: str = "auto"  # 'auto' (by device), 'sequential' or 'log': cells/scan.py

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        for k in range(num_layers):
            self.register_parameter(
                f"weight_l{k}", nn.Parameter(torch.empty(self.blocks * hidden_size, self.layer_input_size(k)))
            )
            self.register_parameter(f"bias_l{k}", nn.Parameter(torch.empty(self.blocks * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: uniform in ±1/sqrt(fan_in), for the weights and the bias."""
        for k in range(self.num_layers):
            bound = 1 / math.sqrt(self.layer_input_size(k))
            for p in self.weights(k):
                nn.init.uniform_(p, -bound, bound)

    def weights(self, k: int) -> tuple[Tensor, Tensor]:
        """Layer k's product: W (blocks*H, in) and b (blocks*H)."""
        return getattr(self, f"weight_l{k}"), getattr(self, f"bias_l{k}")

    @staticmethod
    def coefficients(proj: Tensor) -> tuple[Tensor, Tensor]:
        """The product's output (..., blocks*H) -> a, b of h = a * h_prev + b."""
        raise NotImplementedError

    @staticmethod
    def log_coefficients(proj: Tensor) -> tuple[Tensor, Tensor]:
        """The same, as log a and log b, computed in log space (for the parallel scan)."""
        raise NotImplementedError

    @staticmethod
    def activations(proj: Tensor) -> dict[str, Tensor]:
        """The named gates and candidate of one step, for internals."""
        raise NotImplementedError

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Each layer: one product over the window, then the scan from the carried state."""
        (h0,) = state
        kind = pick_scan(self.scan, x.device)
        out, last = x, []
        for k in range(self.num_layers):
            inp = F.dropout(out, self.dropout, training=True) if k > 0 and self.dropout and self.training else out
            proj = F.linear(inp, *self.weights(k))  # (B, T, blocks*H)
            if kind == "log":
                h = log_scan(*self.log_coefficients(proj), h0[k])
            else:
                h = sequential_scan(*self.coefficients(proj), h0[k])
            last.append(h[:, -1])
            out = h + inp if k > 0 else h  # the residual connection above the first layer
        return out, (torch.stack(last),)

    def layer_step(self, k: int, x: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        (h,) = state
        proj = F.linear(x, *self.weights(k))
        a, b = self.coefficients(proj)
        h = a * h + b
        return (h + x if k > 0 else h), (h,), {**self.activations(proj), "hidden": h}

    @classmethod
    def decoder(cls, cells: list[MinimalCell], embeddings: list[Tensor], dtype: str = "fp32") -> MinimalDecoder:
        return MinimalDecoder(cells, embeddings, dtype)

    def native_spec(self, embedding: Tensor) -> NativeSpec:
        """This model's step for the native library (cells/native.py): one product per layer, no recurrent matrix."""
        w = [self.weights(k) for k in range(self.num_layers)]  # (W, b)
        rest = range(1, self.num_layers)
        return NativeSpec(
            self.name,
            self.blocks,
            F.linear(embedding, *w[0]),
            rec=[None for _ in w],
            inp=[None] + [w[k][0] for k in rest],
            bias=[None] + [w[k][1] for k in rest],
        )


class MinimalDecoder:
    """One step of M minimal cells of one class and shape: per layer one product (layer 0's is a
    table over the vocabulary, gathered by id) and the pointwise update; nothing reads h but it."""

    @torch.no_grad()
    def __init__(self, cells: list[MinimalCell], embeddings: list[Tensor], dtype: str = "fp32"):
        self.layers, self.coefficients = cells[0].num_layers, type(cells[0]).coefficients
        w = [[c.weights(k) for k in range(self.layers)] for c in cells]  # [m][k] = (W, b)
        self.table0 = torch.stack([F.linear(e, *wm[0]) for e, wm in zip(embeddings, w)])  # (M, V, blocks*H)
        self.w = [None] + [products([wm[k][0] for wm in w], dtype) for k in range(1, self.layers)]
        self.b = [None] + [torch.stack([wm[k][1] for wm in w]).unsqueeze(1) for k in range(1, self.layers)]  # (M, 1, blocks*H)

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,), h (M, L, B, H) -> top-layer output (M, B, H), new state."""
        (h,) = state
        h_all = torch.empty_like(h)
        x = None
        for k in range(self.layers):
            proj = self.table0[:, ids] if k == 0 else affine(self.b[k], self.w[k], x)
            a, b = self.coefficients(proj)
            new = torch.addcmul(b, a, h[:, k], out=h_all[:, k])
            x = new + x if k > 0 else new
        return x, (h_all,)
