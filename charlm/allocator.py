"""Keep freed memory in the process, so a training step reuses its pages instead of faulting them in.

Why: each training step allocates and frees the same few hundred MB (activations, oneDNN's LSTM
workspaces, gradients). By default glibc serves large blocks with fresh mmap'd pages and gives
freed memory back to the kernel, so every step touches its memory for the first time again. On
the development machine a 2x512 LSTM step (batch 64 x 100) took about 156,000 page faults; with
the settings below it takes none and runs 1.55-1.86x faster (benchmarks/allocator_faults.py;
docs/performance.md, "The allocator"). The cost: memory freed stays reserved by the process, so
resident memory stays at its peak instead of dropping between steps (prepare of the Linux tree:
peak RSS 307 -> 868 MiB, while 1.57x faster).

`CHARLM_MALLOC=system` leaves the allocator alone (for comparison). Elsewhere than glibc (macOS,
musl), this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

# mallopt parameters (glibc <malloc.h>); values are C ints.
M_TRIM_THRESHOLD = -1  # free memory at the top of the heap above this is returned to the kernel
M_TOP_PAD = -2  # extra bytes requested whenever the heap grows
M_MMAP_THRESHOLD = -3  # blocks above this get their own mmap, unmapped again on free
_SETTINGS = {M_MMAP_THRESHOLD: 2**31 - 1, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 1 << 30}
STREAMING_MMAP_THRESHOLD = 1 << 20  # prepare: every chunk-sized buffer gets its own mapping
GLIBC_MMAP_THRESHOLD = 128 << 10  # glibc's initial threshold (it would then adapt; a set value stays fixed)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("CHARLM_MALLOC", "").lower() == "system":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS.items())


def _mallopt():
    """glibc's mallopt, or None elsewhere (macOS, musl: whose mallopt is a stub)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


@contextlib.contextmanager
def streaming():
    """For prepare's chunked passes: large buffers go back to the OS when freed, then the process's settings return.

    Why: after the first large block is freed glibc raises its mmap threshold (up to 32 MiB), so the
    next multi-megabyte chunk buffers come from the heap, which fragments and grows with the input
    (1.1 GB of text peaked at 1.09 GB RSS). A fixed 1 MiB threshold maps each one on its own.
    Training in the same process (`charlm train TEXT` prepares first) must get back the
    keep-freed-memory settings, or every step faults its pages in again: this is the one place
    that switches between the two.
    """
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, STREAMING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, _SETTINGS[M_MMAP_THRESHOLD] if _applied else GLIBC_MMAP_THRESHOLD)
