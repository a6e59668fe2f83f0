"""Data-parallel training across processes: torchrun's environment, the process group, and the
few collective operations the training loop needs. The gradient all-reduce itself is PyTorch's
DistributedDataParallel; nothing here reimplements it.

One process is `World()` (size 1), whose methods are cheap identities, so the training loop reads
the same with one rank or many. Several ranks come from torchrun (WORLD_SIZE, RANK, LOCAL_RANK in
the environment); `launch` is `charlm train --nproc N`, which runs torchrun itself.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from charlm.errors import CharlmError

BACKENDS = ("auto", "nccl", "gloo")
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")

# Every collective (and joining the group) gives up after this long instead of hanging forever when
# a peer is stuck. It must cover the slowest thing one rank does while the others wait for it:
# rank 0 writing a checkpoint, or preparing a text corpus before the others read it (prepare big
# corpora beforehand with `charlm prepare`).
TIMEOUT = timedelta(minutes=10)

T = TypeVar("T")


class RanksFailed(CharlmError):
    """A run launched by `launch` failed. `reported`: a rank already printed why, so say nothing more."""

    def __init__(self, message: str, reported: bool):
        super().__init__(message)
        self.reported = reported


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    """NCCL for CUDA tensors, Gloo for CPU ones; an explicit choice must suit the device."""
    if backend not in BACKENDS:
        raise CharlmError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if device.type not in ("cpu", "cuda"):
        raise CharlmError(
            f"data-parallel training runs on CUDA (NCCL) or CPU (Gloo), not {device.type}; use --device cpu or cuda"
        )
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise CharlmError("--backend nccl needs CUDA devices; use --backend gloo (or auto) for CPU training")
    if backend == "nccl" and not dist.is_nccl_available():
        raise CharlmError(f"this torch ({torch.__version__}) was built without NCCL; use --backend gloo")
    return backend


def in_torchrun() -> bool:
    """True in a worker that torchrun (or an equivalent launcher) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: World() is a plain single process."""

    size: int = 1  # ranks in the run
    rank: int = 0  # this process, 0..size-1; rank 0 logs and writes checkpoints
    local_rank: int = 0  # this process on its machine: picks the GPU
    local_size: int = 1  # ranks of this run on this machine: they share its cores (charlm/threads.py)
    backend: str | None = None  # nccl or gloo; None for a single process

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that reports progress and writes files."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for collectives: NCCL only moves GPU tensors, Gloo CPU ones."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def place(self, device: torch.device) -> torch.device:
        """The device this rank trains on: each rank on a machine takes its own GPU, cuda:LOCAL_RANK."""
        if self.size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of the world_size x batch_size-row training layout, the same for the whole run."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def share(self, n: int) -> tuple[int, int]:
        """[lo, hi): this rank's contiguous share of n items, as even as can be (a rank may get none)."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around the model (it broadcasts rank 0's weights); the model itself alone."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def sync_interval(self, loss_sum: torch.Tensor, elapsed: float, stop: bool) -> tuple[float, float, bool]:
        """Once per logging interval, so all ranks act alike: (the loss sum averaged over ranks, rank 0's
        clock, whether any rank was asked to stop). Also the interval's one host sync."""
        if self.size == 1:
            return float(loss_sum), elapsed, stop
        # One small all-reduce carries all three: the clock only from rank 0, so the sum is its value.
        t = torch.stack(
            [
                loss_sum.detach().double().reshape(()),
                torch.tensor(elapsed if self.is_main else 0.0, dtype=torch.float64, device=loss_sum.device),
                torch.tensor(1.0 if stop else 0.0, dtype=torch.float64, device=loss_sum.device),
            ]
        ).to(self.comm_device)
        dist.all_reduce(t)
        total, clock, stops = t.tolist()
        return total / self.size, clock, stops > 0

    def gather_rows(self, state: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The full carried state: each (num_layers, B, H) tensor joined over ranks into (num_layers, size*B, H)."""
        if self.size == 1:
            return tuple(state)
        full = []
        for s in state:
            s = s.detach().to(self.comm_device).contiguous()
            parts = [torch.empty_like(s) for _ in range(self.size)]
            dist.all_gather(parts, s)
            full.append(torch.cat(parts, dim=1))  # rank r's rows land at [r*B, (r+1)*B): the training layout
        return tuple(full)

    def in_turn(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 first, then on each machine's local rank 0, then everywhere else.

        For work that fills a cache (preparing a corpus): the first run writes it, the rest find it,
        whether the machines share a disk or not, and no two processes write it at once.
        """
        if self.size == 1:
            return fn()
        result = None
        for turn in (self.rank == 0, self.local_rank == 0 and self.rank != 0, self.local_rank != 0):
            if turn:
                result = fn()
            self.barrier()
        return result

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.size > 1:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def reseed(self, seed: int, step: int) -> None:
        """Give ranks > 0 their own dropout masks; rank 0 keeps the single-process random stream.

        Every rank starts from the same initial weights (DDP also broadcasts rank 0's), but identical
        masks on every rank would correlate the noise across the batch. Only rank 0's generator goes
        into checkpoints, so after a resume the others derive theirs again from (seed, rank, step).
        """
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + self.rank * 7919 + step) % (1 << 63))

    def close(self) -> None:
        """Leave the process group (a no-op for a single process). Whatever wraps the model in
        DDP must be gone by now (Trainer.run lets it go): its reducer must not outlive the group."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device, backend: str = "auto") -> World:
    """Join the process group torchrun describes in the environment; without torchrun, World()."""
    if backend not in BACKENDS:
        raise CharlmError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if not in_torchrun():
        return World()
    try:
        size, rank, local_rank = (int(os.environ[k]) for k in ENV_VARS)
    except (KeyError, ValueError):
        raise CharlmError(
            f"WORLD_SIZE is set but {', '.join(ENV_VARS)} are not all integers; start the ranks with torchrun"
        ) from None
    chosen = pick_backend(device, backend)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CharlmError(
                f"local rank {local_rank} has no GPU of its own: this machine has {torch.cuda.device_count()}; "
                f"use --nproc-per-node {torch.cuda.device_count()} (one rank per GPU)"
            )
        torch.cuda.set_device(local_rank)
    _import_group_defaults()
    try:
        dist.init_process_group(chosen, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise CharlmError(
            f"rank {rank} could not join the process group ({_first_line(e)}); check the torchrun rendezvous flags"
        ) from None
    local_size = _env_int("LOCAL_WORLD_SIZE", 1)  # torchrun sets it; another launcher may not
    return World(size=size, rank=rank, local_rank=local_rank, local_size=local_size, backend=chosen)


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def _import_group_defaults() -> None:
    """Import, before the process group exists, the torch modules that bind it at import time.

    torch.distributed.nn.functional declares `def broadcast(..., group=group.WORLD)` and the like:
    the default is evaluated when the module is first imported, and DDP imports it lazily (through
    torch._dynamo) on its first use, after init_process_group. Ten function defaults then hold the
    Gloo process group, so destroy_process_group() cannot free it: its worker threads, its TCP loop
    and rank 0's store thread run on into interpreter shutdown, where the group is destroyed at an
    arbitrary point of the teardown, and now and then a rank aborts there ("terminate called without
    an active exception", SIGABRT) or hangs joining a thread. Imported first, the defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401  (about 2 ms)


def live_group_threads() -> list[str]:
    """The names of this process's Gloo and store threads (Linux; empty elsewhere): none may be left after close()."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:  # the thread ended while we looked
            continue
        if name.startswith(("pt_gloo", "gloo", "pt_tcpstore")):
            names.append(name)
    return sorted(names)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether an error is a collective that failed, usually because another rank died first."""
    return isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower()


def launch(nproc: int, train_args: Sequence[str]) -> None:
    """`charlm train --nproc N`: run `torchrun --standalone --nproc-per-node N -m charlm train ARGS` here.

    torchrun's own entry point, called in this process, so that a failed run ends as one line and
    exit code 1 rather than torchrun's error report. Returns when every rank has finished.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise CharlmError(f"--nproc must be at least 1 (got {nproc})")
    if in_torchrun():
        raise CharlmError("--nproc starts torchrun itself; under torchrun, leave it out")
    # Each rank's share of the free cores, measured once here before any rank starts (the ranks would
    # otherwise see each other's start-up as load); torchrun would set 1, with a banner saying so.
    from charlm import threads

    share = None if "OMP_NUM_THREADS" in os.environ else str(threads.choose("train", ranks=nproc))
    # Its logs would repeat, as a report, what the failed rank already said in one line.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "charlm", "train", *train_args])
    try:
        if share is not None:  # for the ranks only: this process (a test, a notebook) keeps its environment
            os.environ["OMP_NUM_THREADS"] = share
        run(args)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        if 1 in codes.values():  # a rank ended through the CLI's error path: its one line is printed
            raise RanksFailed("a rank failed", reported=True) from None
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise RanksFailed(f"rank {rank} died ({how}); the other ranks were stopped", reported=False) from None
    except SignalException as e:
        # Ctrl-C, SIGTERM or SIGHUP reached the launcher: torchrun passed it on to the ranks, which
        # save, stop and say so (rank 0's one line); anything else killed the run unannounced.
        raise RanksFailed(f"stopped by {e.sigval.name}", reported=e.sigval.name in ("SIGINT", "SIGTERM", "SIGHUP")) from None
    finally:
        if share is not None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
