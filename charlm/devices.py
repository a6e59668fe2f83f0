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


# What `auto` may be asked to choose for: training; step-by-step decoding of one stream (sample,
# beam at small width, the API's generation); many streams or whole windows at once (sample
# --num-samples 64, the server's batch); an ensemble stepped one stream at a time; evaluation.
USES = ("train", "step", "batch", "ensemble", "eval")

# int8 weights change the distribution sampled from: auto picks them only where that cost is below
# this, in bits per character scored step by step (benchmarks/decode_quality.py). Measured: +0.0000
# to +0.0012 on three 2x256 Shakespeare models, +0.0004 for their ensemble (docs/performance.md).
INT8_MAX_COST_BITS = 0.005


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether a CUDA device runs bf16 natively (Ampere and later; torch's own test)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no including_emulation
        return bool(torch.cuda.is_bf16_supported())


def resolve_dtype(device: torch.device, use: str) -> str:
    """What `--dtype auto` means for this use on this device: fp32, bf16 or int8.

    The rule, measured (docs/performance.md, "What auto picks"):
    - eval: always fp32: a score is a figure people compare, so it is exact unless asked otherwise;
    - a CPU with native bf16 (AVX-512 BF16 or AMX): bf16 for training and for many streams (products
      of many rows: bf16 halves the bytes and doubles the rate); int8 weights for one stream and for an
      ensemble (the weights are read once per character, so their size sets the pace; 1.2-1.4x
      bf16 here), whose cost in bits is far under INT8_MAX_COST_BITS;
    - a GPU with bf16: bf16 for everything but eval (int8 has no GPU kernel: it would run as bf16);
    - anything else (a CPU without bf16, where bf16 is emulated ~100x slower; older GPUs; MPS): fp32.
    """
    if use not in USES:
        raise CharlmError(f"dtype auto: the use must be one of {', '.join(USES)} (got {use!r})")
    if use == "eval":
        return "fp32"
    if device.type == "cpu" and cpu_has_bf16():
        return "int8" if use in ("step", "ensemble") else "bf16"
    if device.type == "cuda" and gpu_has_bf16(device):
        return "bf16"
    return "fp32"


def check_dtype(device: torch.device, dtype: str) -> None:
    """Refuse a reduced precision the device cannot run, before any work starts. `auto` is always
    fine: it resolves (resolve_dtype) to something this device runs."""
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
