"""LSTM with peephole connections (Gers & Schmidhuber 2000; Graves 2013's notation): the input and
forget gates see the previous cell state, the output gate the new one, through diagonal weights.

    i = σ(W_xi x + W_hi h + p_i ⊙ c + b_i)     f = σ(W_xf x + W_hf h + p_f ⊙ c + b_f)
    g = tanh(W_xg x + W_hg h + b_g)            c' = f ⊙ c + i ⊙ g
    o = σ(W_xo x + W_ho h + p_o ⊙ c' + b_o)    h' = o ⊙ tanh(c')

No fused kernel exists for it. Training: the window's input product in one go, then
PeepholeLayer (cells/peephole_kernel.py: the recurrence and a hand-written backward). Decoding:
PeepholeDecoder, the LSTM decoder's packed products with the peepholes added.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from charlm.cells.base import Cell, State, register
from charlm.cells.lstm import GateProducts
from charlm.cells.native import NativeSpec
from charlm.cells.peephole_kernel import PeepholeLayer


@register
class Peephole(Cell):
    name = "peephole"
    description = "LSTM with peephole connections (Gers & Schmidhuber 2000): gates see the cell state"
    state_names = ("h", "c")
    gate_names = ("input_gate", "forget_gate", "output_gate")
    forget_block = 1  # (i, f, g, o): --forget-bias starts this block's bias at the value given

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        H = hidden_size
        for k in range(num_layers):
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * H, self.layer_input_size(k))))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * H, H)))
            self.register_parameter(f"bias_l{k}", nn.Parameter(torch.empty(4 * H)))
            self.register_parameter(f"peephole_l{k}", nn.Parameter(torch.empty(3, H)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation, uniform in ±1/sqrt(H), for every tensor, the peepholes too."""
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Layer k's W_ih (4H, in), W_hh (4H, H), bias (4H), in gate order (i, f, g, o), and peepholes (3, H) for (i, f, o)."""
        return tuple(getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias", "peephole"))

    def layer_step(self, k: int, x: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        h, c = state
        w_ih, w_hh, b, (p_i, p_f, p_o) = self.weights(k)
        i, f, g, o = (x @ w_ih.t() + h @ w_hh.t() + b).chunk(4, dim=1)
        i, f, g = (i + p_i * c).sigmoid(), (f + p_f * c).sigmoid(), g.tanh()
        c = f * c + i * g
        o = (o + p_o * c).sigmoid()
        tanh_c = c.tanh()
        h = o * tanh_c
        acts = {"input_gate": i, "forget_gate": f, "output_gate": o, "candidate": g, "cell": c, "cell_tanh": tanh_c, "hidden": h}
        return h, (h, c), acts

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Per layer: the window's input product (one matrix product), then the recurrence kernel."""
        h0, c0 = state
        out, hs, cs = x, [], []
        for k in range(self.num_layers):
            if k > 0 and self.dropout and self.training:
                out = F.dropout(out, self.dropout, training=True)
            w_ih, w_hh, b, peep = self.weights(k)
            xp = F.linear(out, w_ih, b).float().transpose(0, 1).contiguous()  # (T, B, 4H)
            seq, c = PeepholeLayer.apply(xp, w_hh.float(), peep.float(), h0[k].float(), c0[k].float())
            out = seq.transpose(0, 1)
            hs.append(seq[-1])
            cs.append(c)
        return out, (torch.stack(hs), torch.stack(cs))

    @classmethod
    def decoder(cls, cells: list[Peephole], embeddings: list[Tensor], dtype: str = "fp32") -> PeepholeDecoder:
        return PeepholeDecoder(cells, embeddings, dtype)

    def native_spec(self, embedding: Tensor) -> NativeSpec:
        """This model's step for the native library (cells/native.py): the LSTM's, with the peepholes."""
        w = [self.weights(k) for k in range(self.num_layers)]  # (w_ih, w_hh, b, peep)
        rest = range(1, self.num_layers)
        return NativeSpec(
            self.name,
            4,
            embedding @ w[0][0].t() + w[0][2],
            rec=[w[0][1]] + [None for _ in rest],
            inp=[None] + [torch.cat([w[k][0], w[k][1]], dim=1) for k in rest],
            bias=[None] + [w[k][2] for k in rest],
            peep=[wk[3] for wk in w],
        )


class PeepholeDecoder:
    """One step of M peephole LSTMs of one shape: the LSTM decoder's products (GateProducts), plus
    the peepholes' three pointwise products."""

    @torch.no_grad()
    def __init__(self, cells: list[Peephole], embeddings: list[Tensor], dtype: str = "fp32"):
        self.layers, self.hidden = cells[0].num_layers, cells[0].hidden_size
        w = [[c.weights(k) for k in range(self.layers)] for c in cells]  # [m][k] = (w_ih, w_hh, b, peep)
        self.products = GateProducts([[wm[k][:3] for k in range(self.layers)] for wm in w], embeddings, dtype)
        self.peep = [torch.stack([wm[k][3] for wm in w]).unsqueeze(2) for k in range(self.layers)]  # (M, 3, 1, H)

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,), h and c (M, L, B, H) -> top-layer h (M, B, H), new h and c."""
        h, c = state
        h_all, c_all = torch.empty_like(h), torch.empty_like(c)
        x = None
        for k in range(self.layers):
            i, f, g, o = self.products(k, ids, x, h[:, k]).chunk(4, dim=2)  # (M, B, H) each
            p_i, p_f, p_o = self.peep[k].unbind(1)  # each (M, 1, H)
            c_prev = c[:, k]
            i, f = torch.addcmul(i, p_i, c_prev).sigmoid_(), torch.addcmul(f, p_f, c_prev).sigmoid_()
            c_new = torch.addcmul(f * c_prev, i, g.tanh(), out=c_all[:, k])
            o = torch.addcmul(o, p_o, c_new).sigmoid_()
            x = torch.mul(o, torch.tanh(c_new), out=h_all[:, k])
        return x, (h_all, c_all)
