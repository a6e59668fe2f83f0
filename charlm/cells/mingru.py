"""minGRU (Feng et al. 2024): a GRU whose gate and candidate read the input alone.

    z = σ(W_z x + b_z)    h̃ = g(W_h x + b_h)    h' = (1 - z) * h + z * h̃

g (cells/scan.py) keeps h̃ positive, so the recurrence can run in log space as a parallel scan.
What it shares with minLSTM (the scan, stacking, decoding): cells/minimal.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells.base import register
from charlm.cells.minimal import MinimalCell
from charlm.cells.scan import g, log_g


@register
class MinGRU(MinimalCell):
    name = "mingru"
    description = "minGRU: gates from the input alone, the window as one scan (Feng et al. 2024)"
    state_names = ("h",)
    gate_names = ("update_gate",)
    blocks = 2

    @staticmethod
    def coefficients(proj: Tensor) -> tuple[Tensor, Tensor]:
        k_z, k_h = proj.chunk(2, dim=-1)
        z = torch.sigmoid(k_z)
        return 1 - z, z * g(k_h)

    @staticmethod
    def log_coefficients(proj: Tensor) -> tuple[Tensor, Tensor]:
        k_z, k_h = proj.chunk(2, dim=-1)
        return -F.softplus(k_z), -F.softplus(-k_z) + log_g(k_h)  # log(1 - z), log z + log h̃

    @staticmethod
    def activations(proj: Tensor) -> dict[str, Tensor]:
        k_z, k_h = proj.chunk(2, dim=-1)
        return {"update_gate": torch.sigmoid(k_z), "candidate": g(k_h)}
