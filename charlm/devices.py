"""Device and precision choice, in one place: which device a command runs on, and whether (and how)
it runs its products in bf16. Training, evaluation and decoding all ask here."""

from __future__ import annotations

import contextlib

import torch

from charlm.errors import CharlmError


def pick_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit device that is missing is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CharlmError(f"--device cuda, but this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if name == "mps" and not has_mps:
        raise CharlmError("--device mps, but MPS is not available here; use --device cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16, AMX or similar).

    Without it oneDNN's LSTM cannot run in bf16 at all ("could not create a primitive descriptor")
    and a bf16 matrix product is emulated, about 100x slower than fp32 (AVX2-only machine: 0.8 vs
    96 GFLOP/s for 1024x1024).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_dtype(device: torch.device, dtype: str) -> None:
    """Refuse a reduced precision the device cannot run, before any work starts."""
    if dtype in ("bf16", "int8") and device.type == "cpu" and not cpu_has_bf16():
        raise CharlmError(
            f"--dtype {dtype} needs a CPU with bf16 support (AVX-512 BF16 or AMX), and this one has none: "
            "oneDNN's LSTM cannot run in bf16 here; use --dtype fp32"
        )


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on the given device, or nothing for fp32. Whole windows (the prime, eval)
    have no int8 path: with dtype int8 they run in bf16, and only the single steps use int8."""
    if dtype in ("bf16", "int8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
