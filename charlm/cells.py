"""One-step recurrent cells for decoding, from a trained CharRNN's weights.

nn.LSTM dispatches to the oneDNN sequence kernel, which is fast for long windows but costs about
a millisecond per layer for a single step on CPU. Generation takes one step at a time, so it uses
these plain matrix products instead. The first layer's input products are precomputed per
vocabulary entry (embedding @ W_ih + biases), so a step reads one row of a table instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.model import CharRNN, State


class Stepper:
    """Single-step forward of a CharRNN: ids (B,) and state -> logits (B, V) and state."""

    @torch.no_grad()
    def __init__(self, model: CharRNN):
        cfg = model.cfg
        self.cell, self.layers = cfg.cell, cfg.num_layers
        rnn = model.rnn
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = [], [], [], []
        for k in range(cfg.num_layers):
            self.w_ih.append(getattr(rnn, f"weight_ih_l{k}").t().contiguous())  # (in, G*H)
            self.w_hh.append(getattr(rnn, f"weight_hh_l{k}").t().contiguous())  # (H, G*H)
            self.b_ih.append(getattr(rnn, f"bias_ih_l{k}").clone())
            self.b_hh.append(getattr(rnn, f"bias_hh_l{k}").clone())
        # Layer 0's input contribution for every vocabulary entry: (V, G*H).
        self.table0 = model.embed.weight @ self.w_ih[0] + self.b_ih[0]
        if self.cell != "gru":  # GRU keeps b_hh apart: it sits inside the reset gate
            self.table0 += self.b_hh[0]
            for k in range(1, cfg.num_layers):
                self.b_ih[k] = self.b_ih[k] + self.b_hh[k]
        self.w_head = model.head.weight.t().contiguous()  # (H, V)
        self.b_head = model.head.bias.clone()

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        hs, cs = list(state[0].unbind(0)), (list(state[1].unbind(0)) if self.cell == "lstm" else None)
        x = None
        for k in range(self.layers):
            gi = self.table0[ids] if k == 0 else torch.addmm(self.b_ih[k], x, self.w_ih[k])  # (B, G*H)
            h = hs[k]
            if self.cell == "lstm":
                gates = gi.addmm_(h, self.w_hh[k])
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * cs[k] + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                cs[k] = c
            elif self.cell == "gru":
                gh = torch.addmm(self.b_hh[k], h, self.w_hh[k])
                ir, iz, in_ = gi.chunk(3, dim=1)
                hr, hz, hn = gh.chunk(3, dim=1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(in_ + r * hn)
                h = n + z * (h - n)
            else:
                h = torch.tanh(gi.addmm_(h, self.w_hh[k]))
            hs[k] = h
            x = h
        logits = torch.addmm(self.b_head, x, self.w_head)  # (B, V)
        new_state = (torch.stack(hs),) + ((torch.stack(cs),) if self.cell == "lstm" else ())
        return logits, new_state
