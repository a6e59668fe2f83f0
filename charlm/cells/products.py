"""Matrix products for single decoding steps: packed once, in fp32, bf16 or int8.

nn.LSTM and friends dispatch to oneDNN's sequence kernels, fast for whole windows but about a
millisecond per layer for one step on CPU; decoding takes one step at a time, so the cells'
decoders use these products instead:

- on CPU, each matrix is packed once into oneDNN's blocked layout and multiplied by oneDNN's
  linear kernel: for the few rows of a decoding step (1 stream, a beam of 10) torch.mm (MKL) runs
  far below this CPU's rate; measured for 1024x2048 fp32, 1 row 177 -> 90 us, 10 rows 1,031 -> 143 us.
  Without oneDNN (CUDA, other builds) plain matrix products are used.
- dtype 'bf16' stores and multiplies the matrices in bf16 (state, gates and output stay fp32): half
  the weight bytes per step, several times faster for batches on CPUs with bf16 matrix units.
  dtype 'int8' stores them as int8 with a scale per row (Int8Product): a quarter of the bytes, for
  single streams and ensembles.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Product:
    """x (B, in) -> x @ W.T (B, out) for a fixed W (out, in), in the given dtype, packed once.

    The packed oneDNN weight is tried with one probe call; any failure falls back to torch.mm.
    """

    def __init__(self, w: Tensor, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        w = w.detach().to(dtype).contiguous()
        self.packed = None
        if w.device.type == "cpu" and _onednn_available():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                torch.ops.mkldnn._linear_pointwise(torch.zeros(1, w.shape[1], dtype=dtype), packed, None, "none", [], "")
                self.packed = packed
            except (RuntimeError, NotImplementedError):
                pass
        self.wt = w.t().contiguous() if self.packed is None else None

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return torch.mm(x, self.wt)


class Int8Product:
    """x (B, in) -> x @ W.T (B, out), W stored as int8 with one scale per output row (weight-only).

    For a single stream a step reads every weight once, and that reading is the cost: int8 reads a
    quarter of fp32's bytes and half of bf16's. It matters most for ensembles, whose members'
    weights together outgrow the caches one model fits in. Activations are bf16; the weights are
    rounded to 255 levels per row (relative error of a product about 1%, the figures differ more
    from fp32 than bf16's do). Where the int8 kernel is missing, the dequantized weights are
    multiplied in bf16: the same numbers, without the speed.
    """

    def __init__(self, w: Tensor):
        w = w.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # one per output row
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.fallback = None
        try:
            # PyTorch 2.13's CPU kernel crashes (it does not raise) unless `in` is a multiple of 16.
            if w.device.type != "cpu" or w.shape[1] % 16:
                raise NotImplementedError
            torch.ops.aten._weight_int8pack_mm(torch.zeros(1, w.shape[1], dtype=torch.bfloat16), self.q, self.scale)
        except (RuntimeError, NotImplementedError, AttributeError):
            self.fallback = Product(self.q.float() * self.scale.float()[:, None], torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        if self.fallback is not None:
            return self.fallback(x)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)


def product(w: Tensor, dtype: str) -> Product | Int8Product:
    """The decoding product for a weight matrix (out, in) in a decoding dtype: fp32, bf16 or int8."""
    if dtype == "int8":
        return Int8Product(w)
    return Product(w, torch.bfloat16 if dtype == "bf16" else torch.float32)


def products(weights: list[Tensor], dtype: str) -> list:
    """One product per member (an ensemble's models step together, each with its own weights)."""
    return [product(w, dtype) for w in weights]


def add_products(into: Tensor, prods: list, inputs: Tensor) -> Tensor:
    """into[m] += inputs[m] @ W_m.T for each member m, in place (fp32); returns into. into (M, B, out), inputs (M, B, in)."""
    for m, w in enumerate(prods):
        into[m].add_(w(inputs[m]))
    return into


def affine(bias: Tensor, prods: list, inputs: Tensor) -> Tensor:
    """bias[m] + inputs[m] @ W_m.T for each member m, in fp32: bias (M, 1, out), inputs (M, B, in) -> (M, B, out).

    Each product's result and its bias are added straight into the output (one pass, no copy of the
    bias first): a decoding step is short enough for one extra pass over (B, out) to show.
    """
    out = torch.empty(inputs.shape[0], inputs.shape[1], bias.shape[-1], device=bias.device)
    for m, w in enumerate(prods):
        torch.add(w(inputs[m]), bias[m], out=out[m])
    return out
