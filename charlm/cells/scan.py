"""The linear recurrence h_t = a_t * h_{t-1} + b_t over a whole window, two ways (minGRU, minLSTM).

Both take a (the decay) and b (the input) for every step at once, the products that made them
having run over the whole window in one go:

- `sequential_scan`: a loop over time, one fused multiply-add per step, with a backward pass of its
  own (one multiply-add per step going back, then the gradients of a and b in one pass each). On a
  CPU this is the fast form: the work per step is tiny and the loop's cost is the T calls.
- `log_scan`: the parallel form of Feng et al. (2024), in log space for stability: with
  A_t = a_1 ... a_t, h_t = A_t h_0 + A_t * sum_{s<=t} b_s / A_s, and the sum is a cumulative
  log-sum-exp of log b_s - log A_s. No loop over time: a handful of whole-window operations, which
  wins where each operation is cheap to launch and runs wide (a GPU), and loses on a 2-core CPU,
  where the exp/log work over (B, T, H) costs more than the loop (measured in docs/results.md).
  b must be positive (both cells make it so); h_0 may have any sign (its term is kept apart).

`pick_scan` chooses by device: log_scan on CUDA, sequential_scan elsewhere; a cell's `scan`
attribute forces one (tests and benchmarks compare them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCANS = ("auto", "sequential", "log")


def _fp32(t: Tensor) -> Tensor:
    """At least fp32 (the recurrence accumulates; bf16 from autocast is widened, fp64 kept)."""
    return t if t.dtype == torch.float64 else t.float()


class _SequentialScan(torch.autograd.Function):
    """a, b (T, B, H), h0 (B, H) -> h (T, B, H), time first so that each step is one contiguous block."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        h = torch.empty_like(b)
        prev = h0
        for t in range(b.shape[0]):
            prev = torch.addcmul(b[t], a[t], prev, out=h[t])
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, h, h0 = ctx.saved_tensors
        grad_b = torch.empty_like(grad_h)  # dL/dh_t including what flows back from later steps
        carry = grad_b[-1].copy_(grad_h[-1])
        for t in range(grad_h.shape[0] - 2, -1, -1):
            carry = torch.addcmul(grad_h[t], a[t + 1], carry, out=grad_b[t])
        h_prev = torch.cat([h0.unsqueeze(0), h[:-1]])
        return grad_b * h_prev, grad_b, a[0] * grad_b[0]


def sequential_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """a, b (B, T, H), h0 (B, H) -> h (B, T, H): the recurrence, step by step, in fp32."""
    a, b = _fp32(a).transpose(0, 1).contiguous(), _fp32(b).transpose(0, 1).contiguous()
    return _SequentialScan.apply(a, b, _fp32(h0)).transpose(0, 1)


def log_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """log a, log b (B, T, H), h0 (B, H) -> h (B, T, H): the recurrence as a parallel scan, in fp32."""
    log_big_a = torch.cumsum(_fp32(log_a), dim=1)  # log A_t
    from_inputs = torch.exp(log_big_a + torch.logcumsumexp(_fp32(log_b) - log_big_a, dim=1))
    return torch.exp(log_big_a) * _fp32(h0).unsqueeze(1) + from_inputs


def pick_scan(kind: str, device: torch.device) -> str:
    """'sequential' or 'log': the form `kind` names, or for 'auto' the one that wins on this device
    (the parallel form on CUDA, the sequential one elsewhere)."""
    if kind not in SCANS:
        raise ValueError(f"scan must be one of {', '.join(SCANS)} (got {kind!r})")
    if kind == "auto":
        return "log" if device.type == "cuda" else "sequential"
    return kind


def g(x: Tensor) -> Tensor:
    """The candidate's activation (Feng et al.): x + 0.5 for x >= 0, sigmoid(x) below: positive and
    continuous, linear for large inputs, so that the candidate's logarithm exists."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without forming g(x) where it is tiny."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))
