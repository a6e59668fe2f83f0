"""The native library's one-call helpers outside the decoding step: the draw of one row, dynamic
evaluation's weight update, and what the compiled library uses on this CPU (charlm/cells/native.py
builds and loads it)."""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.cells.native import library


def features() -> dict[str, bool]:
    """What the compiled library uses on this CPU (empty without it)."""
    lib = library()
    if lib is None:
        return {}
    bits = lib.cl_features()
    return {"avx512": bool(bits & 1), "avx512_bf16": bool(bits & 2), "avx512_vnni": bool(bits & 4), "openmp": bool(bits & 8)}


def draw(logits: Tensor, temperature: float, u: float) -> int:
    """sampling.draw for one row (V,) of fp32 logits or log-probs at a temperature, in one call; -1 without the library."""
    lib = library()
    if lib is None:
        return -1
    return lib.cl_draw(logits.data_ptr(), logits.shape[-1], temperature, u)


def _plain(t: Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


def dyn_update(p: Tensor, g: Tensor, scale: Tensor | None, p0: Tensor, decay: Tensor | float, lr: float) -> bool:
    """Dynamic evaluation's update of one weight in place, bit for bit as decoding/dynamic.py's tensor code
    (pull = p0 - p; p -= lr * (g * scale); p += pull * decay) in one pass; False (nothing done) where
    the library or the tensors' layout does not allow it."""
    lib = library()
    decay_t = decay if isinstance(decay, Tensor) else None
    if lib is None or not all(_plain(t) for t in (p, g, scale, p0, decay_t)):
        return False
    if any(t is not None and t.numel() != p.numel() for t in (g, scale, p0, decay_t)):
        return False
    lib.cl_dyn_update(
        p.data_ptr(),
        g.data_ptr(),
        None if scale is None else scale.data_ptr(),
        p0.data_ptr(),
        None if decay_t is None else decay_t.data_ptr(),
        0.0 if decay_t is not None else float(decay),
        lr,
        p.numel(),
    )
    return True
