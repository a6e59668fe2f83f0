"""Processes that share a run dir or a checkpoint: one training owns a run dir (a lock), ranks die with
their launcher, and readers of last.safetensors never see a half-replaced file while it is saved.

Each test starts real `charlm train` processes (python -m charlm) on a tiny model and waits for
conditions by polling, every wait bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, assert_clean_error, run

from charlm import checkpoint
from charlm.training import runlock


def env() -> dict:
    return {**os.environ, "CHARLM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_training(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A long training (it runs until killed) in a process of its own; its output in out's sibling log."""
    log = open(out.parent / f"{out.name}.{time.monotonic_ns()}.log", "w")
    cmd = [sys.executable, "-m", "charlm", "train", str(data), "--out", str(out), *FAST, "--max-steps", "1000000", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)


def wait_for(condition, timeout: float = 90.0, what: str = "a condition", proc: subprocess.Popen | None = None):
    """Poll `condition` every 50 ms until it is true (returns its value) or the time is up (fails)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (code {proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"waited {timeout} s for {what}")


def steps(out: Path) -> list[int]:
    """The steps of the train records in OUT/metrics.jsonl (a torn last line left out)."""
    found = []
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            found.append(record["step"])
    return found


def lock_holder(out: Path) -> int | None:
    try:
        text = (out / runlock.LOCK_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(timeout=60)


@pytest.fixture
def owner(tmp_path, prepared):
    """A training that owns tmp_path/run, started and past its first logged step."""
    out = tmp_path / "run"
    proc = start_training(prepared.dir, out, "--log-every", "1", "--eval-every", "20")
    try:
        wait_for(lambda: steps(out) and lock_holder(out) == proc.pid, what="the first training's first step", proc=proc)
        yield proc, out
    finally:
        stop(proc)


@pytest.mark.parametrize(
    "second",
    [[], ["--resume", "auto"], ["--overwrite"], ["--resume", "auto", "--overwrite"]],
    ids=["same-command", "resume-auto", "overwrite", "resume-auto-overwrite"],
)
def test_a_second_training_in_a_live_run_dir_is_refused(owner, prepared, second):
    proc, out = owner
    wait_for(lambda: (out / "last.safetensors").exists(), what="the first checkpoint", proc=proc)
    r = run("train", prepared.dir, "--out", out, *FAST, "--max-steps", "5", *second)
    assert_clean_error(r, rf"is in use by process {proc.pid}; wait or choose another --out")
    assert proc.poll() is None  # the owner trains on
    seen = len(steps(out))
    wait_for(lambda: len(steps(out)) > seen + 3, what="more steps of the owner", proc=proc)
    stop(proc, signal.SIGTERM)  # saves last and stops
    logged = steps(out)
    assert logged == list(range(1, len(logged) + 1))  # one run's records: every step once, in order
    assert checkpoint.read_meta(out / "last.safetensors")["train_state"]["step"] == logged[-1]


def test_resume_auto_twice_one_trains_the_other_is_refused(tmp_path, prepared):
    out = tmp_path / "run"
    first = start_training(prepared.dir, out, "--resume", "auto", "--log-every", "1", "--eval-every", "5")
    try:
        wait_for(
            lambda: (out / "last.safetensors").exists() and lock_holder(out) == first.pid, what="the first checkpoint", proc=first
        )
        r = run("train", prepared.dir, "--out", out, *FAST, "--max-steps", "1000000", "--resume", "auto")
        assert_clean_error(r, rf"in use by process {first.pid}")
        parts = [p for p in out.iterdir() if p.name.endswith(".part")]
        assert first.poll() is None, parts  # its save in progress was not taken for a stale one
    finally:
        stop(first)


def test_a_killed_owner_leaves_no_stale_lock(owner, prepared):
    proc, out = owner
    wait_for(lambda: (out / "last.safetensors").exists(), what="the first checkpoint", proc=proc)
    stop(proc, signal.SIGKILL)
    assert (out / runlock.LOCK_FILE).exists()  # the file stays; the lock went with the process
    started = time.monotonic()
    r = run("train", "--resume", "auto", "--out", out, "--max-steps", str(steps(out)[-1] + 2))
    assert r.exit_code == 0, r.output
    assert time.monotonic() - started < 60
    assert not (out / runlock.LOCK_FILE).exists()  # released (and removed) at the end


def test_under_nproc_the_ranks_die_with_their_launcher(tmp_path, prepared):
    out = tmp_path / "run"
    launcher = start_training(prepared.dir, out, "--nproc", "2", "--log-every", "2", "--eval-every", "1000000")
    try:
        wait_for(lambda: steps(out), timeout=180, what="the ranks' first logged step", proc=launcher)
        ranks = children(launcher.pid)
        assert len(ranks) == 2, ranks
        assert lock_holder(out) == launcher.pid  # the launcher holds the run dir for its ranks
        os.kill(launcher.pid, signal.SIGKILL)  # what the OOM killer does
        launcher.wait(timeout=30)
        gone = time.monotonic()
        wait_for(lambda: not any(alive(pid) for pid in ranks), timeout=10, what="the ranks to die")
        assert time.monotonic() - gone < 10
        logged = len(steps(out))
        time.sleep(1.0)
        assert len(steps(out)) == logged  # nothing more written
    finally:
        for pid in children(launcher.pid):
            os.kill(pid, signal.SIGKILL)
        stop(launcher)


def children(pid: int) -> list[int]:
    """The live processes whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for a parent that is gone to reap it, has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_readers_never_see_a_save_in_progress_as_corrupt(tmp_path, prepared):
    """200 sample and eval calls on last.safetensors while a training replaces it at every step: all succeed."""
    out = tmp_path / "run"
    proc = start_training(prepared.dir, out, "--log-every", "1", "--eval-every", "1")
    try:
        last = out / "last.safetensors"
        wait_for(last.exists, what="the first checkpoint", proc=proc)
        seen = set()
        for i in range(200):
            args = ["sample", last, "--length", "5", "--seed", str(i)] if i % 2 else ["eval", last, "--json"]
            r = run(*args)
            assert r.exit_code == 0 and "corrupt" not in r.output, f"call {i}: {args}\n{r.output}"
            seen.add(checkpoint.read_meta(last)["train_state"]["step"])
        assert proc.poll() is None
        assert len(seen) > 20, seen  # the file was replaced many times while it was read
    finally:
        stop(proc)
