"""GRU (Cho et al. 2014), as PyTorch defines it:

    r = σ(W_ir x + b_ir + W_hr h + b_hr)    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

Training runs nn.GRU's fused kernel; decoding runs GRUDecoder's packed products.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from charlm.cells.base import State, register
from charlm.cells.fused import FusedCell
from charlm.cells.native import NativeSpec
from charlm.cells.products import affine, products


@register
class GRU(FusedCell, nn.GRU):
    name = "gru"
    description = "GRU (PyTorch's nn.GRU: oneDNN / cuDNN kernels)"
    state_names = ("h",)
    gate_names = ("reset_gate", "update_gate")
    fused_module = nn.GRU

    def layer_step(self, k: int, x: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        (h,) = state
        w_ih, w_hh, b_ih, b_hh = self.weights(k)
        ir, iz, in_ = (x @ w_ih.t() + b_ih).chunk(3, dim=1)
        hr, hz, hn = (h @ w_hh.t() + b_hh).chunk(3, dim=1)
        r, z = (ir + hr).sigmoid(), (iz + hz).sigmoid()
        n = (in_ + r * hn).tanh()
        h = (1 - z) * n + z * h
        return h, (h,), {"reset_gate": r, "update_gate": z, "candidate": n, "hidden": h}

    @classmethod
    def decoder(cls, cells: list["GRU"], embeddings: list[Tensor], dtype: str = "fp32") -> "GRUDecoder":
        return GRUDecoder(cells, embeddings, dtype)

    def native_spec(self, embedding: Tensor) -> NativeSpec:
        """This model's step for the native library (cells/native.py): the input and recurrent products apart."""
        w = [self.weights(k) for k in range(self.num_layers)]  # (w_ih, w_hh, b_ih, b_hh)
        rest = range(1, self.num_layers)
        return NativeSpec(
            self.name,
            3,
            embedding @ w[0][0].t() + w[0][2],
            rec=[wk[1] for wk in w],
            inp=[None] + [w[k][0] for k in rest],
            bias=[None] + [w[k][2] for k in rest],
            bias_h=[wk[3] for wk in w],
        )


class GRUDecoder:
    """One step of M GRUs of one shape. The recurrent product stays apart from the input one (the n
    gate needs r * (W_hn h + b_hn)); layer 0's input product is a table over the vocabulary."""

    @torch.no_grad()
    def __init__(self, cells: list[GRU], embeddings: list[Tensor], dtype: str = "fp32"):
        self.layers = cells[0].num_layers
        w = [[c.weights(k) for k in range(self.layers)] for c in cells]  # [m][k] = (w_ih, w_hh, b_ih, b_hh)
        self.table0 = torch.stack([e @ wm[0][0].t() + wm[0][2] for e, wm in zip(embeddings, w)])  # (M, V, 3H)
        self.w_ih = [None] + [products([wm[k][0] for wm in w], dtype) for k in range(1, self.layers)]
        self.b_ih = [None] + [torch.stack([wm[k][2] for wm in w]).unsqueeze(1) for k in range(1, self.layers)]  # (M, 1, 3H)
        self.w_hh = [products([wm[k][1] for wm in w], dtype) for k in range(self.layers)]
        self.b_hh = [torch.stack([wm[k][3] for wm in w]).unsqueeze(1) for k in range(self.layers)]

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,), h (M, L, B, H) -> top-layer h (M, B, H), new state."""
        (h,) = state
        h_all = torch.empty_like(h)
        x = None
        for k in range(self.layers):
            gi = self.table0[:, ids] if k == 0 else affine(self.b_ih[k], self.w_ih[k], x)  # (M, B, 3H)
            gh = affine(self.b_hh[k], self.w_hh[k], h[:, k])
            ir, iz, in_ = gi.chunk(3, dim=2)
            hr, hz, hn = gh.chunk(3, dim=2)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            x = torch.add(n, z * (h[:, k] - n), out=h_all[:, k])
        return x, (h_all,)
