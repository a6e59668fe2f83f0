"""LSTM (Hochreiter & Schmidhuber 1997, with a forget gate), as PyTorch defines it:

    i = σ(W_ii x + b_ii + W_hi h + b_hi)    f = σ(W_if x + b_if + W_hf h + b_hf)
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)  o = σ(W_io x + b_io + W_ho h + b_ho)
    c' = f * c + i * g                      h' = o * tanh(c')

Training runs nn.LSTM's fused kernel; decoding runs LSTMDecoder's packed products.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from charlm.cells.base import State, register
from charlm.cells.fused import FusedCell, outputs_before
from charlm.cells.native import NativeSpec
from charlm.cells.products import add_products, affine, products
from charlm.cells.scan import sequential_scan


@register
class LSTM(FusedCell, nn.LSTM):
    name = "lstm"
    description = "LSTM with a forget gate (PyTorch's nn.LSTM: oneDNN / cuDNN kernels)"
    state_names = ("h", "c")
    gate_names = ("input_gate", "forget_gate", "output_gate")
    forget_block = 1  # (i, f, g, o): --forget-bias starts this block of b_ih at the value given, of b_hh at 0
    fused_module = nn.LSTM

    def layer_step(self, k: int, x: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        h, c = state
        i, f, g, o = self._gates(k, x, h)
        c = f * c + i * g
        acts = _named(i, f, g, o, c)
        return acts["hidden"], (acts["hidden"], c), acts

    def _gates(self, k: int, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w_ih, w_hh, b_ih, b_hh = self.weights(k)
        i, f, g, o = (x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).chunk(4, dim=1)
        return i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()

    def layer_acts(self, k: int, x: Tensor, out: Tensor, layer_state: State) -> dict[str, Tensor]:
        """FusedCell.layer_acts with the cell state, which the fused kernel does not give per step: the
        gates for all steps at once from h_{t-1} (= out[t-1]), then c_t = f_t c_{t-1} + i_t g_t as a scan."""
        h0, c0 = layer_state
        B, T = out.shape[:2]
        prev = outputs_before(h0, out)
        i, f, g, o = (a.view(B, T, -1) for a in self._gates(k, x.reshape(B * T, -1), prev.reshape(B * T, -1)))
        return _named(i, f, g, o, sequential_scan(f, i * g, c0))

    @classmethod
    def decoder(cls, cells: list[LSTM], embeddings: list[Tensor], dtype: str = "fp32") -> LSTMDecoder:
        return LSTMDecoder(cells, embeddings, dtype)

    def native_spec(self, embedding: Tensor) -> NativeSpec:
        """This model's step for the native library (cells/native.py), gates in PyTorch's (i, f, g, o) order."""
        w = [self.weights(k) for k in range(self.num_layers)]  # (w_ih, w_hh, b_ih, b_hh)
        rest = range(1, self.num_layers)
        return NativeSpec(
            self.name,
            4,
            embedding @ w[0][0].t() + (w[0][2] + w[0][3]),
            rec=[w[0][1]] + [None for _ in rest],
            inp=[None] + [torch.cat([w[k][0], w[k][1]], dim=1) for k in rest],
            bias=[None] + [w[k][2] + w[k][3] for k in rest],
        )


def _named(i: Tensor, f: Tensor, g: Tensor, o: Tensor, c: Tensor) -> dict[str, Tensor]:
    """An LSTM step's internals by name, from its activated gates and new cell state."""
    tanh_c = c.tanh()
    return {
        "input_gate": i,
        "forget_gate": f,
        "output_gate": o,
        "candidate": g,
        "cell": c,
        "cell_tanh": tanh_c,
        "hidden": o * tanh_c,
    }


def _gate_order(w: Tensor, hidden: int) -> Tensor:
    """PyTorch's (i, f, g, o) gate blocks along dim 0 -> (i, f, o, g): one sigmoid covers three gates."""
    i, f, g, o = w.split(hidden, dim=0)
    return torch.cat([i, f, o, g], dim=0)


def lstm_update(gates: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor, hidden: int) -> Tensor:
    """The LSTM cell after its products: gates (..., 4H) in (i, f, o, g) order, activated in place;
    the new cell state written into c_out and the new h into h_out, which is returned."""
    H = hidden
    sig = gates[..., : 3 * H].sigmoid_()
    g = gates[..., 3 * H :].tanh_()
    i, f, o = sig[..., :H], sig[..., H : 2 * H], sig[..., 2 * H :]
    c = torch.addcmul(f * c_prev, i, g, out=c_out)
    return torch.mul(o, torch.tanh(c), out=h_out)


class GateProducts:
    """The matrix products of one step of an LSTM-shaped cell (lstm, peephole) for M members, each
    member's layers given as (W_ih, W_hh, bias) with the bias summed: layer 0's input product is a
    table over the vocabulary (embedding @ W_ih + bias), so a step gathers a row instead of
    multiplying; above it [x, h] goes through one stacked matrix; packed products (products.py)."""

    @torch.no_grad()
    def __init__(self, layers: list[list[tuple[Tensor, Tensor, Tensor]]], embeddings: list[Tensor], dtype: str = "fp32"):
        n = len(layers[0])
        self.table0 = torch.stack([e @ lw[0][0].t() + lw[0][2] for e, lw in zip(embeddings, layers)])  # (M, V, 4H)
        self.w_hh0 = products([lw[0][1] for lw in layers], dtype)
        self.w_cat = [None] + [products([torch.cat([lw[k][0], lw[k][1]], dim=1) for lw in layers], dtype) for k in range(1, n)]
        self.b = [None] + [torch.stack([lw[k][2] for lw in layers]).unsqueeze(1) for k in range(1, n)]  # (M, 1, 4H)

    def __call__(self, k: int, ids: Tensor, x: Tensor | None, h: Tensor) -> Tensor:
        """Layer k's gate pre-activations (M, B, 4H): from the ids (layer 0) or the layer below's x, and h (M, B, H)."""
        if k == 0:
            return add_products(self.table0[:, ids], self.w_hh0, h)
        return affine(self.b[k], self.w_cat[k], torch.cat([x, h], dim=2))


class LSTMDecoder:
    """One step of M LSTMs of one shape, as few operations as possible:

    - layer 0's input product is precomputed for every vocabulary entry (embedding @ W_ih + biases),
      so a step gathers one row of a table instead of multiplying;
    - in the layers above, input and recurrent weights are stacked into one matrix, so [x, h] takes
      one matrix product instead of two;
    - gate columns are reordered to (i, f, o, g), so one sigmoid covers three gates;
    - the members' products stay apart (each has its own weights), every pointwise operation runs
      once over all of them, stacked along the leading member axis.
    """

    @torch.no_grad()
    def __init__(self, cells: list[LSTM], embeddings: list[Tensor], dtype: str = "fp32"):
        self.layers, self.hidden = cells[0].num_layers, cells[0].hidden_size
        H = self.hidden
        layer = [
            [[_gate_order(w, H) for w in c.weights(k)] for k in range(self.layers)] for c in cells
        ]  # [m][k] = (w_ih, w_hh, b_ih, b_hh)
        self.products = GateProducts(
            [[(w_ih, w_hh, b_ih + b_hh) for w_ih, w_hh, b_ih, b_hh in lw] for lw in layer], embeddings, dtype
        )

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,), h and c (M, L, B, H) -> top-layer h (M, B, H), new h and c."""
        h, c = state
        h_all, c_all = torch.empty_like(h), torch.empty_like(c)
        x = None
        for k in range(self.layers):
            gates = self.products(k, ids, x, h[:, k])  # (M, B, 4H)
            x = lstm_update(gates, c[:, k], c_all[:, k], h_all[:, k], self.hidden)
        return x, (h_all, c_all)
