"""charlm/threads.py: an explicit count wins, else the free cores; ranks split them; long runs follow them."""

import os

import pytest
import torch

from charlm import CharlmError, threads
from charlm.viz import trace


@pytest.fixture(autouse=True)
def no_explicit_count(monkeypatch):
    """The policy itself, whatever the shell or the other tests set."""
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)


def test_an_explicit_count_wins_in_order(monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda **kw: pytest.fail("an explicit count needs no measurement"))
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.choose("step") == 5
    monkeypatch.setenv(threads.ENV_VAR, "3")  # --threads 3
    assert threads.choose("train") == 3
    assert threads.choose("batch", threads=2) == 2  # the API's keyword
    assert threads.requested() == 3


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_count_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv(threads.ENV_VAR, bad)
    with pytest.raises(CharlmError, match=r"\$CHARLM_THREADS must be a whole number of threads"):
        threads.choose("step")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(CharlmError, match="at least 1"):
        threads.choose("step", threads=0)
    with pytest.raises(CharlmError, match="one of step, batch, train"):
        threads.choose("decode")
    with pytest.raises(CharlmError, match="ranks"):
        threads.choose("train", ranks=0)


@pytest.mark.parametrize(
    "free, expected", [(0.0, 1), (0.6, 1), (0.75, 1), (1.0, 1), (1.69, 1), (1.7, 2), (2.0, 2), (7.9, 8), (30.0, 8)]
)
def test_the_free_cores_decide(monkeypatch, free, expected):
    """A core counts when at least 70% of it is idle; at least one thread, at most one per physical core."""
    monkeypatch.setattr(threads, "free_cores", lambda ranks=1, **kw: free)
    assert threads.choose("batch") == expected


def test_ranks_share_the_free_cores(monkeypatch):
    asked = []
    monkeypatch.setattr(threads, "free_cores", lambda ranks=1, **kw: asked.append(ranks) or 8.0 / ranks)
    assert threads.choose("train", ranks=2) == 4
    assert asked == [2]


def test_use_sets_and_restores_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(threads.ENV_VAR, str(before + 1))
    with threads.use("step") as n:
        assert n == torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_free_cores_measures_the_machine():
    free = threads.free_cores(0.02)
    assert 0.0 <= free <= threads.usable_cores() + 1e-6
    # A second reading soon after reuses the first as its start: no sleep, still a sane figure.
    again = threads.free_cores(0.0)
    assert 0.0 <= again <= threads.usable_cores() + 1e-6


def test_a_reading_after_a_mark_or_soon_after_another_does_not_sleep_again(monkeypatch):
    slept = []
    real_sleep = threads.time.sleep
    monkeypatch.setattr(threads.time, "sleep", lambda s: slept.append(s) or real_sleep(s))
    threads.mark(max_age=0.0)  # a fresh start whatever an earlier test read
    real_sleep(0.03)
    first = threads.free_cores(0.05)
    assert all(s <= 0.021 for s in slept)  # only what was left of the interval since the mark (none if overslept)
    before = len(slept)
    for _ in range(5):  # within the interval: that figure again, no sleep (a loop of short generate() calls)
        assert threads.free_cores(10.0) == first
    assert len(slept) == before <= 1


def test_own_work_counts_as_free():
    """A process's own busy time is what it would give back on fewer threads: it counts as free."""
    a = threads.CpuSample(when=0.0, total=0, idle=0, own=0.0)
    cores = os.cpu_count() or 1
    tick = os.sysconf("SC_CLK_TCK")
    # 1 s of wall time: cores * tick ticks in all, none idle, this process busy for 1 CPU second.
    b = threads.CpuSample(when=1.0, total=cores * tick, idle=0, own=1.0)
    assert threads._free_between(a, b) == pytest.approx(min(1.0, threads.usable_cores()))


def test_a_long_run_follows_the_free_cores(monkeypatch):
    free = {"now": 2.0}
    monkeypatch.setattr(threads, "free_cores", lambda ranks=1, **kw: free["now"])
    monkeypatch.setattr(threads, "_free_between", lambda a, b, ranks=1: free["now"])
    before = torch.get_num_threads()
    try:
        follower = threads.Follower("train", every=0.0)
        assert follower.threads == torch.get_num_threads() == 2 and not follower.fixed
        assert follower.poll() is None  # nothing changed
        free["now"] = 1.0  # a process started beside it
        assert follower.poll() == 1 and torch.get_num_threads() == 1
        free["now"] = 2.0  # and ended
        assert follower.poll() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_explicit_count_is_never_followed(monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, "1")
    monkeypatch.setattr(threads, "_free_between", lambda a, b, ranks=1: 8.0)
    before = torch.get_num_threads()
    try:
        follower = threads.Follower("train", every=0.0)
        assert follower.fixed and follower.threads == 1
        assert follower.poll() is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_prepare_environment_keeps_the_users_settings(monkeypatch):
    monkeypatch.setattr(threads, "OPENMP_ENV", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"})
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    threads.prepare_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and os.environ["GOMP_SPINCOUNT"] == "1000"


def test_the_viz_trace_runs_on_the_free_cores(monkeypatch):
    """viz's idle-core logic lives in threads.py now: the trace takes the free cores, and restores torch's count."""
    before = torch.get_num_threads()
    seen = {}
    for free in (8.0, 2.0, 0.0):
        monkeypatch.setattr(threads, "free_cores", lambda ranks=1, free=free, **kw: free)
        with trace.idle_core_threads(torch.device("cpu")):
            seen[free] = torch.get_num_threads()
        assert torch.get_num_threads() == before
    assert seen == {8.0: 8, 2.0: 2, 0.0: 1}
    with trace.idle_core_threads(torch.device("cpu"), threads=3):
        assert torch.get_num_threads() == 3
