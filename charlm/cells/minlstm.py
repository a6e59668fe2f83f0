"""minLSTM (Feng et al. 2024): an LSTM whose gates read the input alone, normalised to sum to one.

    f = σ(W_f x + b_f)    i = σ(W_i x + b_i)    h̃ = g(W_h x + b_h)
    f' = f / (f + i)      i' = i / (f + i)      h' = f' * h + i' * h̃

No output gate and no separate cell state: h is both. What it shares with minGRU (the scan,
stacking, decoding): cells/minimal.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells.base import register
from charlm.cells.minimal import MinimalCell
from charlm.cells.scan import g, log_g


@register
class MinLSTM(MinimalCell):
    name = "minlstm"
    description = "minLSTM: normalised gates from the input alone, the window as one scan (Feng et al. 2024)"
    state_names = ("h",)
    gate_names = ("forget_gate", "input_gate")
    blocks = 3
    forget_block = 0  # --forget-bias starts this block's bias at the value given

    @staticmethod
    def coefficients(proj: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = proj.chunk(3, dim=-1)
        f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
        total = f + i
        return f / total, i / total * g(k_h)

    @staticmethod
    def log_coefficients(proj: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = proj.chunk(3, dim=-1)
        diff = F.softplus(-k_f) - F.softplus(-k_i)  # log i - log f
        return -F.softplus(diff), -F.softplus(-diff) + log_g(k_h)  # log f', log i' + log h̃

    @staticmethod
    def activations(proj: Tensor) -> dict[str, Tensor]:
        k_f, k_i, k_h = proj.chunk(3, dim=-1)
        return {"forget_gate": torch.sigmoid(k_f), "input_gate": torch.sigmoid(k_i), "candidate": g(k_h)}
