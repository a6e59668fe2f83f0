"""How many threads charlm's work runs on: chosen for the machine as it is now. The one owner of that choice.

Call it with the kind of work, around the work:

    from charlm import threads

    with threads.use("step"):            # one stream stepped a character at a time: sample of one
        ...                              # stream, beam at a small width, eval --text, dynamic eval
    with threads.use("batch"):           # many streams or whole windows at once: sample
        ...                              # --num-samples 64, eval of a split, viz's trace
    n = threads.apply("train", ranks=2)  # for the rest of the process (a command that does one thing)

    threads.use(work, threads=None, ranks=1)    -> a context manager; yields the count, restores torch's after
    threads.apply(work, threads=None, ranks=1)  -> int: sets torch's count and returns it
    threads.choose(work, threads=None, ranks=1) -> int: the count only, nothing set

`threads` is the caller's explicit count (the API's keyword). `ranks`: data-parallel processes of one
run on this machine, which split the cores between them.

The choice, in order:
1. an explicit count wins: the `threads` argument, else $CHARLM_THREADS (the CLI's global `--threads N`),
   else $OMP_NUM_THREADS when it is set (the user's, or the per-rank share `train --nproc` passes on);
2. else the free cores: those no other process is using, measured from /proc/stat over 0.1 s (free_cores),
   a core counting when at least 70% of it is idle; at least 1; shared out among `ranks`.

Why: a step of a recurrent model is many short parallel regions, each of which waits for all its
threads. With a thread on a core that another process holds, every region waits for that thread to be
scheduled again, and the whole step slows 5-20x (docs/performance.md, "Sharing the CPU"). Alone, the
extra threads do pay: on the 2-core development machine two threads step one 2x512 LSTM stream 1.1-1.35x
faster than one, and 64 streams 1.6x. So each kind of work takes the cores that are free when it starts,
and training (minutes to hours) looks again as it goes (Follower).

prepare_environment() sets OpenMP's wait policy, which must be set before the OpenMP runtime starts:
the CLI entry point calls it before it imports torch. This module imports torch only inside functions.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from charlm.errors import OptionError

WORK = ("step", "batch", "train")
ENV_VAR = "CHARLM_THREADS"  # the CLI's global --threads flag sets it; torchrun's ranks inherit it
FREE_SHARE = 0.7  # a core counts as free when at least this share of it is idle
INTERVAL = 0.1  # seconds of /proc/stat to measure over when no recent sample can be reused
FOLLOW_EVERY = 10.0  # seconds between two looks at the machine during a long run (Follower)


# -- the OpenMP runtime -----------------------------------------------------------------------
def prepare_environment() -> None:
    """Set OpenMP's wait policy for charlm's short parallel regions; call before `import torch`.

    torch's CPU wheel runs its parallel regions on GNU OpenMP, whose idle threads spin for a while
    (GOMP_SPINCOUNT, 300,000 turns by default) before they sleep, so a region's threads are ready at
    once for the next. Beside a busy process that spinning takes the core the late thread needs.
    A user's own settings are kept (setdefault); see docs/performance.md for the measurement.
    """
    for name, value in OPENMP_ENV.items():
        os.environ.setdefault(name, value)


# What prepare_environment sets. Empty: measured on the development machine, the policy changes
# little once the thread count follows the free cores, and PASSIVE costs one stream alone (see
# docs/performance.md, "OpenMP's wait policy"). Kept as the one place to change it.
OPENMP_ENV: dict[str, str] = {}


# -- measuring the machine --------------------------------------------------------------------
@dataclass(frozen=True)
class CpuSample:
    """A reading of the CPU clocks: when, all CPUs' ticks (total, idle) and this process's CPU seconds."""

    when: float
    total: int
    idle: int
    own: float


def _read_sample() -> CpuSample:
    """The clocks now, from /proc/stat's first line (Linux); OSError elsewhere."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return CpuSample(time.monotonic(), sum(ticks), ticks[3] + ticks[4], time.process_time())


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int:
    """The physical cores among the usable ones (SMT siblings count once; torch's own default),
    from Linux's CPU topology; elsewhere the usable cores."""
    try:
        cpus = os.sched_getaffinity(0)
        cores = set()
        for cpu in cpus:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        return max(1, len(cores))
    except (AttributeError, OSError):
        return usable_cores()


def _free_between(before: CpuSample, after: CpuSample, ranks: int = 1) -> float:
    """Cores free for this process between two samples: the idle share (split among `ranks`) plus
    this process's own use (what it gives back if it runs on fewer threads), in cores."""
    total = after.total - before.total
    if total <= 0:
        return float(usable_cores())
    cores = os.cpu_count() or 1  # /proc/stat counts every CPU, whatever the affinity
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = cores * (after.idle - before.idle) / total
    own = cores * (after.own - before.own) * tick / total
    return max(0.0, min(float(usable_cores()), idle / max(ranks, 1) + own))


_last: CpuSample | None = None  # the previous reading: the start of the next measurement
_recent: tuple[int, float] | None = None  # (ranks, free cores) as measured at _last


def _sample_or_none() -> CpuSample | None:
    """A reading, or None where /proc/stat cannot be read."""
    try:
        return _read_sample()
    except (OSError, ValueError, IndexError):
        return None


def mark(max_age: float = 5.0) -> None:
    """Start a measurement now (the CLI at start-up, load()), so that the first choice of threads reads the
    machine over the time since instead of sleeping for it; a reading younger than max_age is kept."""
    global _last, _recent
    now = _sample_or_none()
    if now is not None and (_last is None or now.when - _last.when > max_age):
        _last, _recent = now, None


def free_cores(interval: float = INTERVAL, ranks: int = 1, max_age: float = 5.0) -> float:
    """How many cores no other process is using, over the time since the previous reading when that is
    between `interval` and `max_age` seconds ago. Sooner than `interval`: that reading's figure again (a
    loop of short calls never sleeps); with none, or an older one: over `interval` seconds (a sleep, of
    what is left of the interval after a mark()). Without /proc/stat: the cores less the 1-minute load
    average, or all of them."""
    global _last, _recent
    try:
        now = _read_sample()
        age = None if _last is None else now.when - _last.when
        if age is not None and age < interval and _recent is not None and _recent[0] == ranks:
            return _recent[1]
        before = _last if age is not None and age <= max_age else now
        wait = interval - (now.when - before.when)
        if wait > 0:
            time.sleep(wait)
            now = _read_sample()
        free = _free_between(before, now, ranks)
        _last, _recent = now, (ranks, free)
        return free
    except (OSError, ValueError, IndexError):
        try:
            return max(0.0, usable_cores() - os.getloadavg()[0]) / max(ranks, 1)
        except (AttributeError, OSError):
            return float(usable_cores()) / max(ranks, 1)


def count_of(free: float) -> int:
    """Threads for `free` cores: each core at least FREE_SHARE idle counts; at least one, at most one
    per physical core (two threads on one core's SMT siblings only contend for its units)."""
    return max(1, min(physical_cores(), math.floor(free + (1.0 - FREE_SHARE))))


# -- the choice -------------------------------------------------------------------------------
def requested(threads: int | None = None) -> int | None:
    """The explicit count, if any: the argument, else $CHARLM_THREADS, else $OMP_NUM_THREADS."""
    if threads is not None:
        return _positive(threads, "threads")
    for name in (ENV_VAR, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return _positive(int(value), f"${name}")
            except ValueError:
                raise OptionError(f"${name} must be a whole number of threads, at least 1 (got {value!r})") from None
    return None


def _positive(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OptionError(f"{what} must be a whole number of threads, at least 1 (got {n!r})")
    return n


def _check_work(work: str, ranks: int) -> None:
    if work not in WORK:
        raise OptionError(f"the kind of work must be one of {', '.join(WORK)} (got {work!r})")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise OptionError(f"ranks must be a whole number, at least 1 (got {ranks!r})")


def choose(work: str, threads: int | None = None, ranks: int = 1) -> int:
    """How many threads `work` ("step", "batch" or "train") should run on now; nothing is set."""
    _check_work(work, ranks)
    explicit = requested(threads)
    if explicit is not None:
        return explicit
    return count_of(free_cores(ranks=ranks))


def apply(work: str, threads: int | None = None, ranks: int = 1) -> int:
    """Choose the count for `work` and set it for torch's operators from now on; returns it."""
    import torch

    n = choose(work, threads, ranks)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextmanager
def use(work: str, threads: int | None = None, ranks: int = 1) -> Iterator[int]:
    """Run the block on the count chosen for `work`; torch's count before it is restored after."""
    import torch

    before = torch.get_num_threads()
    n = apply(work, threads, ranks)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Follower:
    """For a long run (training): the count chosen at the start, then looked at again every
    FOLLOW_EVERY seconds, so that a process that starts (or ends) beside it mid-run costs it its
    share of the cores rather than 10-40x. An explicit count is never changed."""

    def __init__(self, work: str, threads: int | None = None, ranks: int = 1, every: float = FOLLOW_EVERY):
        self.work, self.ranks, self.every = work, ranks, every
        self.fixed = requested(threads) is not None
        self.threads = apply(work, threads, ranks)
        self._since = _sample_or_none()

    def poll(self) -> int | None:
        """Cheap unless `every` seconds have passed: then the free cores since the last look decide the
        count. Returns the new count when it changed, else None."""
        if self.fixed or self._since is None or time.monotonic() - self._since.when < self.every:
            return None
        now = _sample_or_none()
        if now is None:
            return None
        free, self._since = _free_between(self._since, now, self.ranks), now
        n = count_of(free)
        if n == self.threads:
            return None
        import torch

        torch.set_num_threads(n)
        self.threads = n
        return n
