"""The machine in one line: CPU model and ISA level, cores and threads, GPU, and what `auto` picks.

    >>> from charlm import machine
    >>> print(machine.describe())   # what `charlm env` and `charlm bench` print; bug reports get it
    charlm 0.1.0, torch 2.13.0+cpu | CPU AMD EPYC: AVX-512 BF16 (torch AVX512), 2 cores, 2 free, ... | GPU none | auto: ...

`facts()` is the same as a dict (`charlm env --json`).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import charlm
from charlm import threads

# ISA levels, best first, each with the /proc/cpuinfo flags that make it (all of them needed).
ISA_LEVELS = (
    ("AMX", ("amx_tile", "amx_bf16")),
    ("AVX-512 BF16", ("avx512f", "avx512_bf16")),
    ("AVX-512", ("avx512f",)),
    ("AVX2", ("avx2", "fma")),
    ("AVX", ("avx",)),
)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo 'flags', or 'Features' on ARM); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's name as the OS reports it ('model name' on Linux), else platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def isa_level(flags: set[str] | None = None) -> str:
    """The best of AMX, AVX-512 BF16, AVX-512, AVX2, AVX the flags show; else the architecture."""
    flags = cpu_flags() if flags is None else flags
    for name, needed in ISA_LEVELS:
        if all(f in flags for f in needed):
            return name
    return platform.machine() or "unknown"


def gpu_facts() -> list[dict[str, Any]]:
    """Each CUDA device: name, memory (GiB), compute capability, native bf16."""
    import torch

    from charlm.devices import gpu_has_bf16

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "bf16": gpu_has_bf16(torch.device("cuda", i)),
            }
        )
    return out


def facts() -> dict[str, Any]:
    """Everything describe() says, as a dict (JSON-safe)."""
    import torch

    from charlm.devices import USES, cpu_has_bf16, pick_device, resolve_dtype

    device = pick_device("auto")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    free = threads.free_cores()
    return {
        "charlm": charlm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": {
            "model": cpu_model(),
            "isa": isa_level(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": cpu_has_bf16(),
            "cores": threads.physical_cores(),
            "logical_cpus": threads.usable_cores(),
        },
        "threads": {
            "torch_now": torch.get_num_threads(),
            "free_cores": round(free, 2),
            "charlm_would_use": threads.requested() or threads.count_of(free),
            "explicit": threads.requested() is not None,
            "openmp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "gpus": gpu_facts(),
        "mps": has_mps,
        "auto": {"device": str(device), **{use: resolve_dtype(device, use) for use in USES}},
    }


def describe(f: dict[str, Any] | None = None) -> str:
    """The machine in one line (facts() made readable)."""
    f = f or facts()
    cpu, th, auto = f["cpu"], f["threads"], f["auto"]
    gpus = ", ".join(
        f"{g['name']} ({g['memory_gib']:g} GiB, sm {g['capability']}{', bf16' if g['bf16'] else ''})" for g in f["gpus"]
    ) or ("MPS" if f["mps"] else "none")
    chosen = f"{th['charlm_would_use']} ({'--threads/$CHARLM_THREADS/$OMP_NUM_THREADS' if th['explicit'] else 'the free cores'})"
    picks = ", ".join(f"{use} {auto[use]}" for use in auto if use != "device")
    return (
        f"charlm {f['charlm']}, torch {f['torch']}, Python {f['python']} | "
        f"CPU {cpu['model']}: {cpu['isa']} (torch {cpu['torch_capability']}, oneDNN bf16 {'yes' if cpu['onednn_bf16'] else 'no'}), "
        f"{cpu['cores']} cores / {cpu['logical_cpus']} CPUs, {th['free_cores']:g} free; threads {chosen} | "
        f"GPU {gpus} | auto on {auto['device']}: {picks}"
    )
