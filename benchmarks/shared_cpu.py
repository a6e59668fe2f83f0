"""charlm beside another busy process: each figure alone and beside one busy loop, old code against new.

    python benchmarks/shared_cpu.py                  # the real run: 3 rounds, a 2x512 LSTM (10-15 minutes on 2 cores)
    python benchmarks/shared_cpu.py --quick          # a check that it works: 1 round, a 2x128 LSTM (under 2 minutes)
    python benchmarks/shared_cpu.py --wait-policy    # also the new code under OMP_WAIT_POLICY=PASSIVE

Four figures, each through the command line as a user runs it: one-stream sampling (`sample`),
64-stream sampling (`sample --num-samples 64`), `eval --text` (one stream, whole windows) and
training (`train`, the trainer's own chars/s from metrics.jsonl). Each alone and beside one
busy-loop process (`python -c 'while True: pass'`, pinned to no core, the way a user's other
program runs). "old" is commit 3f7633e (before charlm chose its threads), checked out with
`git worktree add` and run through PYTHONPATH; "new" is this checkout. Contenders alternate in
each round (ABBA); figures are medians over the rounds.

Sampling and eval are timed inside the child process, after a warm-up call of the same command
at a tiny size, so interpreter and torch start-up are left out. Floor (issue 23): beside the hog,
every new figure is at least 40% of its alone figure. Writes a JSON record with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "3f7633e"
FLOOR = 0.40
SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\n"

# The child that times one charlm command in-process: a warm-up call (imports, first-call costs),
# then the timed call; prints its seconds. Its working directory is neutral, so the charlm it imports
# is the one PYTHONPATH names.
CHILD = r"""
import contextlib, json, os, sys, time
from charlm.cli import main

def call(argv):
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        try:
            main(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise SystemExit(f"charlm {' '.join(argv)} exited with {e.code}")

warm, full = json.loads(sys.argv[1]), json.loads(sys.argv[2])
call(warm)
start = time.perf_counter()
call(full)
print(time.perf_counter() - start)
"""


class Version:
    """One contender: a tree of charlm code and the environment it runs in."""

    def __init__(self, name: str, tree: Path, work: Path, extra_env: dict[str, str] | None = None):
        self.name, self.tree, self.work = name, tree, work
        self.env = {**os.environ, "PYTHONPATH": str(tree), "CHARLM_CORPORA_DIR": str(work / "corpora"), **(extra_env or {})}
        for key in ("CHARLM_THREADS", "OMP_NUM_THREADS", "CHARLM_CORPUS_MIRROR"):
            self.env.pop(key, None)  # each version chooses its own threads
        if extra_env:
            self.env.update(extra_env)
        work.mkdir(parents=True, exist_ok=True)

    def charlm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "charlm", *args], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise SystemExit(f"{self.name}: charlm {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done

    def timed(self, warm: list[str], full: list[str]) -> float:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(warm), json.dumps(full)],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise SystemExit(f"{self.name}: {' '.join(full)} failed:\n{done.stderr[-2000:]}")
        return float(done.stdout.split()[-1])


def make_text(path: Path, chars: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(rng.choice(list(SYMBOLS), chars)))
    return path


def old_tree(work: Path, commit: str) -> Path:
    """A worktree of the old commit (removed at the end, by main)."""
    tree = work / f"old-{commit}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), commit], check=True, capture_output=True
    )
    return tree


class Cases:
    """The four measurements, sized for --quick or the real run."""

    # Sized so that the old code beside the hog (5-20x slower: the 46-61 chars/s for an fp32
    # eval, 550 chars/s training) still ends in seconds to a minute per case.
    def __init__(self, quick: bool, dtype: str | None, text: Path, eval_text: Path, small_text: Path):
        self.quick = quick
        size = ["--num-layers", "2", "--rnn-size", "128" if quick else "512", "--embed-size", "64"]
        self.model = size + ["--batch-size", "32", "--seq-length", "64" if quick else "128", "--device", "cpu"]
        self.dtype = ["--dtype", dtype] if dtype else []
        self.text, self.eval_text, self.small_text = text, eval_text, small_text
        self.length1 = 300 if quick else 2000
        self.length64 = 30 if quick else 200
        self.steps = 4 if quick else 8

    def checkpoint(self, v: Version) -> Path:
        """A checkpoint of the model's size, trained one step by this version (its own format)."""
        out = v.work / "ckpt"
        v.charlm(
            "train",
            str(self.text),
            "--out",
            str(out),
            "--overwrite",
            "--max-steps",
            "1",
            "--eval-every",
            "1",
            *self.model,
            "--dtype",
            "fp32",
        )
        return out / "last.safetensors"

    def run(self, v: Version, case: str, ckpt: Path) -> float:
        """chars/s of one case, once."""
        c = str(ckpt)
        if case == "sample_1":
            seconds = v.timed(
                ["sample", c, "--length", "2", *self.dtype],
                ["sample", c, "--length", str(self.length1), "--seed", "1", *self.dtype],
            )
            return self.length1 / seconds
        if case == "sample_64":
            seconds = v.timed(
                ["sample", c, "--length", "2", "--num-samples", "64", *self.dtype],
                ["sample", c, "--length", str(self.length64), "--num-samples", "64", "--seed", "1", *self.dtype],
            )
            return 64 * self.length64 / seconds
        if case == "eval_text":
            seconds = v.timed(
                ["eval", c, "--text", str(self.small_text), *self.dtype], ["eval", c, "--text", str(self.eval_text), *self.dtype]
            )
            return len(self.eval_text.read_text()) / seconds
        if case == "train":
            out = v.work / "train-run"
            v.charlm(
                "train",
                str(self.text),
                "--out",
                str(out),
                "--overwrite",
                "--max-steps",
                str(self.steps),
                "--log-every",
                "1",
                "--eval-every",
                "1000000",
                *self.model,
                *self.dtype,
            )
            rates = [
                r["chars_per_s"]
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r.get("kind") == "train"
            ]
            return statistics.median(rates[1:] or rates)  # the first interval holds the warm-up
        raise ValueError(case)


CASES = ("sample_1", "sample_64", "eval_text", "train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, a 2x128 LSTM, short runs: a check that it works")
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--old", default=OLD_COMMIT, help=f"the old commit (default {OLD_COMMIT})")
    ap.add_argument(
        "--dtype",
        default="fp32",
        help="the dtype every command runs in, both versions (default fp32: the "
        "same work on both sides); 'shipped': each version's own defaults",
    )
    ap.add_argument("--wait-policy", action="store_true", help="also run the new code under OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--cases", default=",".join(CASES), help=f"a subset of {','.join(CASES)}")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still stops the hog and removes the worktree
    rounds = args.rounds or (1 if args.quick else 3)
    cases_run = [c for c in args.cases.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="charlm-shared-cpu-") as tmp:
        work = Path(tmp)
        old = old_tree(work, args.old)
        try:
            versions = [Version("old", old, work / "old"), Version("new", ROOT, work / "new")]
            if args.wait_policy:
                versions.append(Version("new+passive", ROOT, work / "new-passive", {"OMP_WAIT_POLICY": "PASSIVE"}))
            text = make_text(work / "text.txt", 20_000 if args.quick else 300_000)
            eval_text = make_text(work / "eval.txt", 500 if args.quick else 3000, seed=2)  # the 3,000-character eval
            small = make_text(work / "small.txt", 100, seed=1)
            cases = Cases(args.quick, None if args.dtype == "shipped" else args.dtype, text, eval_text, small)
            print(f"machine: {describe_machine()}", flush=True)
            print("setting up: a checkpoint per version ...", flush=True)
            ckpts = {v.name: cases.checkpoint(v) for v in versions}
            figures = measure(versions, cases, ckpts, cases_run, rounds)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    report(figures, versions, cases_run, args)


def describe_machine() -> str:
    """The new code's one-line machine description, from a child (this process does not import torch)."""
    done = subprocess.run(
        [sys.executable, "-c", "from charlm import machine; print(machine.describe())"],
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def measure(versions: list[Version], cases: Cases, ckpts: dict, cases_run: list[str], rounds: int) -> dict:
    """figures[version][case][condition] = chars/s of each round; conditions and versions in ABBA order."""
    figures = {v.name: {c: {"alone": [], "hog": []} for c in cases_run} for v in versions}
    conditions = ["alone", "hog"]
    for r in range(rounds):
        for condition in conditions if r % 2 == 0 else conditions[::-1]:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "hog" else None
            try:
                if hog:
                    time.sleep(0.5)  # let it take its core
                order = versions if r % 2 == 0 else versions[::-1]
                for case in cases_run:
                    for v in order:
                        rate = cases.run(v, case, ckpts[v.name])
                        figures[v.name][case][condition].append(rate)
                        print(f"round {r + 1}/{rounds} {condition:<5} {v.name:<12} {case:<10} {rate:>10,.0f} chars/s", flush=True)
            finally:
                if hog:
                    hog.kill()
                    hog.wait()
    return figures


def report(figures: dict, versions: list[Version], cases_run: list[str], args) -> None:
    print(f"\nmedians, chars/s; floor: beside the hog >= {FLOOR:.0%} of alone (new code)")
    print(f"{'case':<10} {'version':<12} {'alone':>10} {'beside hog':>11} {'hog/alone':>10}  {'alone vs old':>12}")
    summary, ok = {}, True
    for case in cases_run:
        old_alone = statistics.median(figures["old"][case]["alone"])
        for v in versions:
            alone = statistics.median(figures[v.name][case]["alone"])
            hog = statistics.median(figures[v.name][case]["hog"])
            ratio = hog / alone
            verdict = ""
            if v.name != "old":
                verdict = "  ok" if ratio >= FLOOR else "  BELOW THE FLOOR"
                ok = ok and ratio >= FLOOR
            summary.setdefault(case, {})[v.name] = {
                "alone": round(alone),
                "hog": round(hog),
                "hog_over_alone": round(ratio, 3),
                "alone_over_old": round(alone / old_alone, 3),
            }
            print(f"{case:<10} {v.name:<12} {alone:>10,.0f} {hog:>11,.0f} {ratio:>10.2f}  {alone / old_alone:>11.2f}x{verdict}")
    print("\nfloor met" if ok else "\nfloor NOT met")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "machine": describe_machine(),
                    "old": args.old,
                    "dtype": args.dtype,
                    "quick": args.quick,
                    "summary": summary,
                    "rounds": figures,
                },
                indent=1,
            )
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
