"""What the cells that wrap PyTorch's fused recurrent modules (nn.LSTM, nn.GRU, nn.RNN) share.

A cell class derives from FusedCell first and the torch module second (`class GRU(FusedCell,
nn.GRU)`): the module's constructor makes the parameters, so their names (weight_ih_l0, ...) and
checkpoints keep their layout, and its forward runs the fused kernels: oneDNN on CPU, cuDNN on CUDA.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from charlm.cells.base import Cell, State


class FusedCell(Cell):
    """A Cell whose parameters and forward pass are those of `fused_module`."""

    fused_module: ClassVar[type[nn.RNNBase]]

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        self.fused_module.__init__(self, input_size, hidden_size, num_layers=num_layers, batch_first=True,
                                   dropout=dropout if num_layers > 1 else 0.0)

    def weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Layer k's (W_ih, W_hh, b_ih, b_hh), in the module's gate order."""
        return (getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}"))

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """The fused kernel over the whole window and stack (dropout between layers while training)."""
        packed = state if len(self.state_names) > 1 else state[0]
        out, new = self.fused_module.forward(self, x, packed)  # (B, T, H)
        return out, (tuple(new) if len(self.state_names) > 1 else (new,))
