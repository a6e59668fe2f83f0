"""`charlm train --nproc N`: the launcher and its ranks.

Ranks die with their launcher. torchrun's ranks are child processes of the launcher; when the
launcher is killed outright (kill -9, the OOM killer), nothing tells them, and they would train on
as orphans, writing checkpoints into a run dir that a resubmitted run may own by then. So the
launcher names itself in the environment (LAUNCHER_ENV), and each rank, first thing, asks Linux to
send it SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG) and starts a watchdog thread that
does the same wherever prctl is missing: a rank whose launcher is gone saves nothing more and is
gone within a second.

Before any rank starts, N is compared with the machine: more ranks than cores is a warning (they
share the cores, and every step waits for the slowest), and more memory than there is (an estimate
per rank) is an error, rather than an OOM kill 20 seconds in.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

WATCH_EVERY = 0.5  # seconds between the watchdog's looks at the parent
RANK_BASE_BYTES = 400 << 20  # a rank's interpreter, torch and its process group, before the model (measured: ~250-350 MB on CPU)


def mark_launcher() -> None:
    """In the launcher, before its ranks start: name this process as their launcher (and the run dir lock's holder)."""
    from charlm.training.runlock import LAUNCHER_ENV

    os.environ[LAUNCHER_ENV] = str(os.getpid())


def die_with_launcher() -> None:
    """In a rank that `charlm train --nproc` started: be killed when the launcher dies. Elsewhere nothing."""
    if "WORLD_SIZE" not in os.environ:  # not a rank: nothing to import, nothing to do
        return
    from charlm.training.runlock import LAUNCHER_ENV

    try:
        launcher = int(os.environ.get(LAUNCHER_ENV, ""))
    except ValueError:
        return
    if launcher == os.getpid():
        return
    _parent_death_signal()
    if os.getppid() != launcher:  # it died before the line above: no signal will come
        _die()
    threading.Thread(target=_watch, args=(launcher,), name="charlm-launcher-watch", daemon=True).start()


def _parent_death_signal() -> None:
    """Linux: SIGKILL this process when its parent ends (PR_SET_PDEATHSIG); elsewhere the watchdog alone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _watch(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(WATCH_EVERY)
    _die()


def _die() -> None:
    """End now: no checkpoint, no handler (the launcher is gone; another run may own the run dir by now)."""
    os.kill(os.getpid(), signal.SIGKILL)


# -- --nproc against the machine ----------------------------------------------------------------


def check_nproc(nproc: int, model_cfg: Any, train_cfg: Any, vocab_size: int) -> list[str]:
    """Warnings about N ranks on this machine (more than its cores); an OptionError if their memory does not fit."""
    from charlm import threads
    from charlm.errors import OptionError

    warnings = []
    cores = threads.usable_cores()
    if nproc > cores:
        warnings.append(
            f"--nproc {nproc} is more than the {cores} cores this process may use: the ranks share them, "
            "and every step waits for the slowest"
        )
    per_rank = rank_bytes(model_cfg, train_cfg, vocab_size)
    available = available_memory()
    if available is not None and per_rank * nproc > available:
        fit = max(1, available // per_rank)
        raise OptionError(
            f"--nproc {nproc}: the ranks would need about {_gb(per_rank * nproc)} of memory ({_gb(per_rank)} each), "
            f"but {_gb(available)} is available here; use --nproc {fit} or fewer (or a smaller --batch-size)"
        )
    return warnings


def rank_bytes(model_cfg: Any, train_cfg: Any, vocab_size: int) -> int:
    """A generous estimate of one rank's memory: the runtime, the model with its gradients, Adam's two
    moments and DDP's buckets (20 bytes a parameter), and twice a step's activations."""
    from dataclasses import replace

    from charlm.checkpoint import model_tensor_shapes

    shapes = model_tensor_shapes(replace(model_cfg, vocab_size=vocab_size))
    params = sum(_numel(s) for s in shapes.values())
    per_position = model_cfg.num_layers * model_cfg.rnn_size * 8 + model_cfg.embed_size + 3 * vocab_size
    activations = train_cfg.batch_size * train_cfg.seq_length * per_position * 4
    return RANK_BASE_BYTES + 20 * params + 2 * activations


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def available_memory() -> int | None:
    """Bytes this process may still use: the lower of the system's available memory and its cgroup's room."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            found.append(max(int(limit) - usage, 0))
    return min(found) if found else None


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"
