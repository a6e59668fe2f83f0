"""Faults during training: kill -9, SIGTERM and SIGHUP at random moments, then check what is left.

    python benchmarks/faults.py [--kills 20] [--signals 5] [--skip-nproc] [--seed 0]

A tiny model (LSTM 2x64, batch 8 x 32, validation and a save every 5 steps, a log record every
step) trains on the first 200 kB of Shakespeare (or a made-up text when the corpus is absent) as
a real process, `python -m charlm train`, and once more with `--nproc 2` (torchrun, Gloo on CPU).
Each trial is a fresh run, faulted after its first checkpoint has appeared:

- kill -9 (the launcher and every rank at once, as the OOM killer or a scheduler's hard kill
  does): after a random delay; or aimed a few ms after a save (the mtime/inode of
  last.safetensors changes); or aimed at a save in flight (a hidden .part file exists);
- SIGTERM, SIGHUP: sent to the launcher only (torchrun passes them on to its ranks), after a
  random delay.

After each fault: the exit code (-9 for kill -9; 1 and one "error: ... stopped by SIGxxx" line for
a signal, no traceback; no rank outlives the launcher), `charlm info OUT/last.safetensors`
loads it, `charlm train --resume OUT/last.safetensors --max-steps K` (K = its step + 3; with
--nproc 2 for the two-process scenarios) continues to step K, no `.*.part` file survives that
start, metrics.jsonl reads as one run (every line JSON, train steps increasing up to K), and
`charlm plot OUT` draws a PNG. For a signal also: no step logged after the saved one (no work lost).

Prints a table (scenario, processes, trials, passed, failed with the first failure's reason,
median seconds per trial, median seconds from the fault to the exit) to stdout and to --out
(default benchmarks/results/faults.txt); exits 1 on any failure. A full run (20 + 5 + 5 trials,
each with one and with two processes) takes about 30 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "corpora" / "shakespeare" / "input.txt"
CORPUS_BYTES = 200_000
MODEL = ["--rnn-size", "64", "--embed-size", "32", "--batch-size", "8", "--seq-length", "32", "--device", "cpu"]
CADENCE = ["--eval-every", "5", "--log-every", "1"]
PART = re.compile(r"\..+\.part")
START_TIMEOUT = 240  # seconds for a run to write its first checkpoint (torchrun and two ranks start slowly)
EXIT_TIMEOUT = 120  # seconds for a signalled run to save and exit
STEP_TIMEOUT = 600  # seconds for a resume, info or plot


@dataclass
class Trial:
    scenario: str
    nproc: int
    index: int
    aim: str = ""
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stop_seconds: float | None = None  # from the fault to the launcher's exit
    parts_left: int = 0  # .part files the fault left behind (the next start must remove them)
    saved_step: int | None = None

    def fail(self, reason: str) -> None:
        self.failures.append(reason)


# -- processes ------------------------------------------------------------------------------


def charlm(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "charlm", *map(str, args)]


def run(cmd: list[str], env: dict, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, None, "", f"timed out after {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc (torchrun's ranks are children of the launcher)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-300:]


# -- the run dir ----------------------------------------------------------------------------


def saved_step(path: Path) -> int | None:
    """train_state.step of a checkpoint, from its safetensors header alone; None if unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return int(json.loads(header["__metadata__"]["meta"])["train_state"]["step"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def parts(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if PART.fullmatch(p.name)) if out.is_dir() else []


def train_steps(out: Path) -> tuple[list[int], int]:
    """The train records' steps in metrics.jsonl, and how many lines are not JSON."""
    steps, bad = [], 0
    path = out / "metrics.jsonl"
    if not path.exists():
        return steps, bad
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and record.get("kind") == "train":
            steps.append(int(record.get("step", -1)))
    return steps, bad


def state_of(out: Path) -> tuple[int, int]:
    """(mtime_ns, inode) of last.safetensors: a save replaces the file, so either changes."""
    try:
        st = os.stat(out / "last.safetensors")
        return st.st_mtime_ns, st.st_ino
    except FileNotFoundError:
        return 0, 0


# -- one trial ------------------------------------------------------------------------------


def start_training(out: Path, prepared: Path, nproc: int, env: dict, log: Path) -> subprocess.Popen:
    cmd = charlm("train", prepared, "--out", out, *MODEL, *CADENCE, "--max-steps", "1000000")
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    stderr = open(log, "w")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, start_new_session=True)


def wait_for_first_checkpoint(proc: subprocess.Popen, out: Path, trial: Trial) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if (out / "last.safetensors").exists():
            return True
        if proc.poll() is not None:
            trial.fail(f"training ended (exit {proc.returncode}) before its first checkpoint")
            return False
        time.sleep(0.05)
    trial.fail(f"no checkpoint within {START_TIMEOUT} s")
    return False


def aim(proc: subprocess.Popen, out: Path, how: str, rng: random.Random) -> str:
    """Wait for the chosen moment; returns what the moment was."""
    if how == "random":
        delay = rng.uniform(0.0, 3.0)
        time.sleep(delay)
        return f"random {delay:.2f}s"
    deadline = time.monotonic() + 20
    if how == "after-save":
        before = state_of(out)
        while time.monotonic() < deadline and proc.poll() is None:
            if state_of(out) != before:
                lag = rng.uniform(0.0, 0.010)
                time.sleep(lag)
                return f"{lag * 1e3:.1f} ms after a save"
            time.sleep(0.0005)
        return "after-save (no save seen)"
    while time.monotonic() < deadline and proc.poll() is None:  # during-save: a .part file exists now
        if parts(out):
            return "during a save"
        time.sleep(0.0002)
    return "during-save (missed: no .part seen)"


def fault(trial: Trial, proc: subprocess.Popen, tree: list[int]) -> None:
    """Deliver the trial's fault: kill -9 to the whole tree (found beforehand: scanning /proc takes ms), a signal to the launcher."""
    if trial.scenario == "kill -9":
        kill_tree(tree)
        kill_tree(descendants(proc.pid))  # anything the run started since (its children are not reparented yet)
    else:
        os.kill(proc.pid, getattr(signal, trial.scenario))


def check_exit(trial: Trial, proc: subprocess.Popen, tree: list[int], log: Path, fault_time: float) -> None:
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        trial.fail(f"still running {EXIT_TIMEOUT} s after {trial.scenario}")
        kill_tree([proc.pid, *descendants(proc.pid)])
        proc.wait()
        return
    trial.stop_seconds = time.monotonic() - fault_time
    time.sleep(0.2)
    survivors = [pid for pid in tree if pid != proc.pid and alive(pid)]
    if survivors:
        trial.fail(f"{len(survivors)} process(es) outlived the launcher")
        kill_tree(survivors)
    stderr = log.read_text(errors="replace")
    if trial.scenario == "kill -9":
        if proc.returncode != -signal.SIGKILL:
            trial.fail(f"exit code {proc.returncode} after kill -9 (expected -9)")
        return
    if proc.returncode != 1:
        trial.fail(f"exit code {proc.returncode} after {trial.scenario} (expected 1): {tail(stderr)}")
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if len(errors) != 1 or f"stopped by {trial.scenario}" not in errors[0]:
        trial.fail(f"expected one 'error: stopped by {trial.scenario} ...' line, got {len(errors)}: {tail(stderr)}")
    if "Traceback" in stderr:
        trial.fail(f"a traceback after {trial.scenario}: {tail(stderr)}")


def check_after(trial: Trial, out: Path, env: dict) -> None:
    last = out / "last.safetensors"
    trial.parts_left = len(parts(out))
    logged_before, _ = train_steps(out)
    r = run(charlm("info", last, "--json"), env)
    if r.returncode != 0:
        trial.fail(f"charlm info: exit {r.returncode}: {tail(r.stderr)}")
        return
    try:
        step = int(json.loads(r.stdout)["train_state"]["step"])
    except (ValueError, KeyError, TypeError):
        trial.fail(f"charlm info --json has no train_state.step: {r.stdout[:200]}")
        return
    trial.saved_step = step
    if trial.scenario != "kill -9" and logged_before and max(logged_before) > step:
        trial.fail(f"work lost: steps up to {max(logged_before)} logged, step {step} saved after {trial.scenario}")
    target = step + 3
    cmd = charlm("train", "--resume", last, "--max-steps", target)
    if trial.nproc > 1:
        cmd += ["--nproc", str(trial.nproc)]
    r = run(cmd, env)
    if r.returncode != 0:
        trial.fail(f"resume to step {target}: exit {r.returncode}: {tail(r.stderr)}")
        return
    if saved_step(last) != target:
        trial.fail(f"resume to step {target} saved step {saved_step(last)}")
    if parts(out):
        trial.fail(f".part file(s) survived the next start: {', '.join(parts(out))}")
    steps, bad = train_steps(out)
    if bad:
        trial.fail(f"metrics.jsonl has {bad} line(s) that are not JSON after the resume")
    elif any(b <= a for a, b in zip(steps, steps[1:])) or not steps or steps[-1] != target:
        trial.fail(f"metrics.jsonl does not read as one run: train steps ...{steps[-8:]} (expected increasing, up to {target})")
    r = run(charlm("plot", out), env)
    png = out / "loss.png"
    if r.returncode != 0:
        trial.fail(f"charlm plot: exit {r.returncode}: {tail(r.stderr)}")
    elif not png.exists() or png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        trial.fail("charlm plot wrote no PNG")


def run_trial(trial: Trial, how: str, work: Path, prepared: Path, env: dict, rng: random.Random) -> None:
    out = work / f"run-{trial.scenario.replace(' ', '').replace('-', '')}-{trial.nproc}-{trial.index}"
    log = work / f"{out.name}.stderr"
    start = time.monotonic()
    proc = start_training(out, prepared, trial.nproc, env, log)
    try:
        if not wait_for_first_checkpoint(proc, out, trial):
            return
        tree = [proc.pid, *descendants(proc.pid)]  # with --nproc: the launcher and torchrun's ranks
        trial.aim = aim(proc, out, how, rng)
        if proc.poll() is not None:
            trial.fail(
                f"training ended by itself (exit {proc.returncode}) before the fault: {tail(log.read_text(errors='replace'))}"
            )
            return
        fault_time = time.monotonic()
        fault(trial, proc, tree)
        check_exit(trial, proc, tree, log, fault_time)
        check_after(trial, out, env)
    finally:
        if proc.poll() is None:
            kill_tree([proc.pid, *descendants(proc.pid)])
            proc.wait()
        trial.seconds = time.monotonic() - start


# -- the benchmark --------------------------------------------------------------------------


def corpus_text() -> tuple[bytes, str]:
    if SHAKESPEARE.exists():
        raw = SHAKESPEARE.read_bytes()[:CORPUS_BYTES]
        return raw.decode("utf-8", "ignore").encode(), f"the first {CORPUS_BYTES // 1000} kB of {SHAKESPEARE}"
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n" for _ in range(4000)]
    return "".join(lines).encode()[:CORPUS_BYTES], "a made-up text (Shakespeare not found)"


def plan(kills: int, signals: int, rng: random.Random) -> list[tuple[str, str]]:
    """(scenario, how to aim) for each trial of one process count."""
    kill_aims = ["random", "random", "after-save", "during-save"]
    trials = [("kill -9", kill_aims[i % len(kill_aims)]) for i in range(kills)]
    trials += [(sig, "random") for sig in ("SIGTERM", "SIGHUP") for _ in range(signals)]
    return trials


def table(trials: list[Trial]) -> list[str]:
    head = f"{'scenario':<9} {'procs':>5} {'trials':>6} {'passed':>6} {'failed':>6} {'median s':>8} {'stop s':>6} {'.part left':>10}  first failure"
    rows = [head, "-" * len(head)]
    groups: dict[tuple[str, int], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.scenario, t.nproc), []).append(t)
    for (scenario, nproc), group in groups.items():
        failed = [t for t in group if t.failures]
        first = f"#{failed[0].index} ({failed[0].aim}): {failed[0].failures[0]}" if failed else ""
        stops = [t.stop_seconds for t in group if t.stop_seconds is not None]
        rows.append(
            f"{scenario:<9} {nproc:>5} {len(group):>6} {len(group) - len(failed):>6} {len(failed):>6} "
            f"{statistics.median(t.seconds for t in group):>8.1f} "
            f"{statistics.median(stops) if stops else float('nan'):>6.2f} "
            f"{sum(t.parts_left > 0 for t in group):>10}  {first}"
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9 trials per process count (default 20)")
    ap.add_argument("--signals", type=int, default=5, help="SIGTERM and SIGHUP trials each, per process count (default 5)")
    ap.add_argument("--skip-nproc", action="store_true", help="only the one-process scenarios (same as --procs 1)")
    ap.add_argument("--procs", default="1,2", help="process counts to run, e.g. 2 for only the --nproc 2 scenarios (default 1,2)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the fault moments")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.txt", help="where to write the table")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs of every trial)")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="charlm-faults-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHARLM_CORPORA_DIR": str(work / "corpora"), "COLUMNS": "200"}
    text, source = corpus_text()
    (work / "corpus.txt").write_bytes(text)
    r = run(charlm("prepare", work / "corpus.txt", "-o", work / "prepared"), env)
    if r.returncode != 0:
        print(f"prepare failed: {r.stderr}", file=sys.stderr)
        return 1

    trials: list[Trial] = []
    started = time.monotonic()
    for nproc in [1] if args.skip_nproc else [int(n) for n in args.procs.split(",")]:
        counts: dict[str, int] = {}
        for scenario, how in plan(args.kills, args.signals, rng):
            counts[scenario] = counts.get(scenario, 0) + 1
            trial = Trial(scenario, nproc, counts[scenario])
            run_trial(trial, how, work, work / "prepared", env, rng)
            trials.append(trial)
            verdict = "ok" if not trial.failures else "FAIL: " + "; ".join(trial.failures)
            print(
                f"[{time.monotonic() - started:6.0f}s] {scenario} x{nproc} #{trial.index} ({trial.aim}), saved step "
                f"{trial.saved_step}, {trial.parts_left} .part left, {trial.seconds:.1f}s: {verdict}",
                file=sys.stderr,
                flush=True,
            )

    rows = table(trials)
    note = [
        f"charlm fault benchmark, {datetime.now(timezone.utc).isoformat(timespec='seconds')}; {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"command: python benchmarks/faults.py {' '.join(sys.argv[1:])}",
        f"corpus: {source}; model: {' '.join(MODEL)} {' '.join(CADENCE)}",
        "kill -9 aims: random delay 0-3 s after the first checkpoint, 0-10 ms after a save, or during a save (.part present)",
        "median s: one trial (start, fault, info, resume to saved step + 3, plot); stop s: from the fault to the launcher's exit; "
        ".part left: trials whose fault left a .part file (the resume must remove it)",
        f"total {time.monotonic() - started:.0f} s",
        "",
    ]
    report = "\n".join(note + rows) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.keep:
        print(f"work dir kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(t.failures for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
