"""What the cells that wrap PyTorch's fused recurrent modules (nn.LSTM, nn.GRU, nn.RNN) share.

A cell class derives from FusedCell first and the torch module second (`class GRU(FusedCell,
nn.GRU)`): the module's constructor makes the parameters, so their names (weight_ih_l0, ...) and
checkpoints keep their layout, and its forward runs the fused kernels: oneDNN on CPU, cuDNN on CUDA.

Inspection (`inspect`, what `charlm viz` reads) is fast too: run layer by layer, the fused kernel
gives each layer's output at every step, so the state before every step is known, and the
equations (`layer_step`) run on all B*T steps at once: one matrix product per layer instead of a
Python step per time step (a 2x512 LSTM over 20,000 characters: see docs/results.md, viz).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor, nn

from charlm.cells.base import Cell, State

# nn.RNNBase.mode -> the functional kernel its forward calls, for one layer at a time
_KERNELS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}


class FusedCell(Cell):
    """A Cell whose parameters and forward pass are those of `fused_module`."""

    fused_module: ClassVar[type[nn.RNNBase]]

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        self.fused_module.__init__(
            self, input_size, hidden_size, num_layers=num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )

    def weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Layer k's (W_ih, W_hh, b_ih, b_hh), in the module's gate order."""
        return (
            getattr(self, f"weight_ih_l{k}"),
            getattr(self, f"weight_hh_l{k}"),
            getattr(self, f"bias_ih_l{k}"),
            getattr(self, f"bias_hh_l{k}"),
        )

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """The fused kernel over the whole window and stack (dropout between layers while training)."""
        packed = state if len(self.state_names) > 1 else state[0]
        out, new = self.fused_module.forward(self, x, packed)  # (B, T, H)
        return out, (tuple(new) if len(self.state_names) > 1 else (new,))

    @torch.no_grad()
    def inspect(self, x: Tensor, state: State) -> tuple[Tensor, dict[str, Tensor], State]:
        """Cell.inspect's numbers, layer by layer: the fused kernel for the outputs, then layer_acts."""
        acts: dict[str, list[Tensor]] = {}
        finals = []
        for k in range(self.num_layers):
            layer_state = tuple(s[k] for s in state)
            out, final = self.fused_layer(k, x, layer_state)
            for name, a in self.layer_acts(k, x, out, layer_state).items():
                acts.setdefault(name, []).append(a)
            finals.append(final)
            x = out
        new_state = tuple(torch.stack([f[i] for f in finals]) for i in range(len(self.state_names)))
        return x, {name: torch.stack(a) for name, a in acts.items()}, new_state

    def fused_layer(self, k: int, x: Tensor, layer_state: State) -> tuple[Tensor, State]:
        """Layer k alone through the fused kernel: x (B, T, in), its state (each (B, H)) -> out (B, T, H), state."""
        hx = tuple(s.unsqueeze(0) for s in layer_state)
        with warnings.catch_warnings():  # cuDNN warns that one layer's weights are not the module's flat buffer: a copy, no harm
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")
            res = _KERNELS[self.mode](x, hx if len(hx) > 1 else hx[0], list(self.weights(k)), True, 1, 0.0, False, False, True)
        return res[0], tuple(s[0] for s in res[1:])

    def layer_acts(self, k: int, x: Tensor, out: Tensor, layer_state: State) -> dict[str, Tensor]:
        """Layer k's named activations at every step (each (B, T, H)) from its input x (B, T, in) and
        its output: for a cell whose state is its output h, the state before step t is out[t-1]."""
        B, T = out.shape[:2]
        prev = outputs_before(layer_state[0], out)
        _, _, acts = self.layer_step(k, x.reshape(B * T, -1), (prev.reshape(B * T, -1),))
        return {name: a.view(B, T, -1) for name, a in acts.items()}


def outputs_before(h0: Tensor, out: Tensor) -> Tensor:
    """A layer's output before each step of a window: h0 (B, H) for the first, out[t-1] after it: (B, T, H)."""
    return torch.cat([h0.unsqueeze(1), out[:, :-1]], dim=1)
