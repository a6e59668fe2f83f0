"""One stream, old code against new code in one run: sample (fp32, bf16, int8), beam width 1 and 4,
`eval --text` over 100,000 characters and `eval --dynamic` over 20,000, each as characters per second
and as a share of the bandwidth roof for the same weights (benchmarks/bandwidth.py).

    python benchmarks/one_stream.py --old 3340e0d                 # old = that commit, new = this tree
    python benchmarks/one_stream.py --old 3340e0d --threads 1 2 --rounds 5 --out benchmarks/results/one_stream

The old code is a git worktree of --old (made under /tmp/one-stream-old if missing), the new code
this checkout; each measurement runs in its own process (PYTHONPATH picks the code, `charlm` is
imported from it: the script checks), and old and new alternate, round after round, so that a
machine that gets busier or quieter mid-run moves both alike; figures are medians over the rounds.
Every process runs on `--threads` threads (OMP_NUM_THREADS and torch.set_num_threads), pinned with
taskset to the first that many CPUs when taskset exists. The model is a 2x512 LSTM (vocabulary of
the text, ~80 symbols) saved once by the old code after one training step (speed does not depend on
the weights); the text is the first characters of corpora/paulgraham (or any --text).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlm import machine  # torch-free: the CPU's name for the report

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (name, what, dtype, size): size is characters generated or scored
    ("sample fp32", "sample", "fp32", 3000),
    ("sample bf16", "sample", "bf16", 3000),
    ("sample int8", "sample", "int8", 3000),
    ("beam width 1", "beam1", "fp32", 600),
    ("beam width 4", "beam4", "fp32", 600),
    ("eval --text 100k", "eval", "fp32", 100_000),
    ("eval --dynamic 20k", "dynamic", "fp32", 20_000),
]
FLOORS = {"sample fp32": 1.5, "eval --text 100k": 3.0}  # and 2.5x in the fastest dtype (checked below)


# -- the worker: one measurement, in the code PYTHONPATH points at --------------------------------
def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import charlm

    text = Path(args.text_file).read_text()
    what, size = args.what, args.size
    lm = charlm.load(args.ckpt, device="cpu", dtype=args.dtype if what.startswith("sample") else "fp32")
    prime = "The "
    if what == "sample":
        lm.generate(prime, length=200, seed=1)  # warm: the native library, the allocator, the caches

        def run():
            return lm.generate(prime, length=size, seed=1)
    elif what.startswith("beam"):
        width = int(what[4:])
        lm.beam(prime, length=50, beam_width=width)

        def run():
            return lm.beam(prime, length=size, beam_width=width)
    elif what == "eval":
        lm.score(text[:5000])

        def run():
            return lm.score(text[: size + 1]).bits_per_char
    else:
        lm.score(text[:600], dynamic=True)

        def run():
            return lm.score(text[: size + 1], dynamic=True).bits_per_char

    t = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - t
    out = {"chars_per_s": size / seconds, "seconds": seconds, "module": charlm.__file__}
    if isinstance(result, float):
        out["bits_per_char"] = result
    if what == "sample":
        out["text_head"] = result[:60]
    print("RESULT " + json.dumps(out))


def profile_worker(args) -> None:
    """Where one step of one-stream sampling goes (Streams, temperature 1), in the code PYTHONPATH points at:
    per-step CPU time of each group (medians of thread_time over many steps) and the operators per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    import charlm
    from charlm.decoding.streams import Streams

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bandwidth

    lm = charlm.load(args.ckpt, device="cpu", dtype=args.dtype)
    scorer = lm.members[0]
    cfg = lm.config
    stepper = scorer.stepper
    native = getattr(stepper, "native", None)  # the new code's one-call step, None in the old code

    def med(fn, n=400):
        for _ in range(50):
            fn()
        ts = []
        for _ in range(7):
            t = time.thread_time()
            for _ in range(n):
                fn()
            ts.append((time.thread_time() - t) / n * 1e6)
        return statistics.median(ts)

    kernel = "native" if native is not None else "torch"
    roof = bandwidth.roof(cfg.num_layers, cfg.rnn_size, len(lm.vocab), args.dtype, kernel)
    streams = Streams(scorer)
    streams.add("The ", 10**9, seed=1)
    streams.step()
    ids = torch.tensor([3])
    state = scorer.start(1)
    out = {"kernel": kernel, "products": roof["us_per_step"]}
    with torch.inference_mode():
        st1 = tuple(s.unsqueeze(0) for s in state)
        if native is not None:
            out["cell + head (one call)"] = med(lambda: native(ids, st1))
        else:
            out["cell + head"] = med(lambda: stepper(ids, st1))
        out["scorer.step (+ log_softmax)"] = med(lambda: scorer.step(ids, state))
        logp = streams._logp
        out["choose (processors + draw)"] = med(lambda: streams._choose(logp))
    out["Streams.step"] = med(lambda: streams.step())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(200):
            streams.step()
    ops = [e for e in prof.events() if e.name.startswith(("aten::", "mkldnn::")) and e.cpu_parent is None]
    names: dict = {}
    for e in ops:
        names[e.name] = names.get(e.name, 0) + 1
    out["top-level operators per step"] = round(len(ops) / 200, 1)
    out["operators"] = {k: round(v / 200, 1) for k, v in sorted(names.items(), key=lambda kv: -kv[1])}
    print("RESULT " + json.dumps(out))


# -- the driver ----------------------------------------------------------------------------------
def ensure_old(rev: str, path: Path) -> str:
    """A worktree of rev at path (made if missing); returns the commit it holds."""
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    return subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def run_worker(code: Path, threads: int, what: str, dtype: str, size: int, ckpt: Path, text_file: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "CHARLM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--what",
        what,
        "--dtype",
        dtype,
        "--size",
        str(size),
        "--ckpt",
        str(ckpt),
        "--text-file",
        str(text_file),
        "--threads",
        str(threads),
    ]
    if shutil.which("taskset") and threads <= (os.cpu_count() or 1):
        cmd = ["taskset", "-c", f"0-{threads - 1}"] + cmd
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=1800)
    line = next((out for out in run.stdout.splitlines() if out.startswith("RESULT ")), None)
    if run.returncode or line is None:
        raise RuntimeError(f"{what} {dtype} in {code} failed:\n{run.stderr[-3000:]}")
    result = json.loads(line[7:])
    if not Path(result["module"]).resolve().is_relative_to(code.resolve()):
        raise RuntimeError(f"the worker imported charlm from {result['module']}, not from {code}")
    return result


def make_model(old: Path, work: Path, text_file: Path) -> Path:
    """A 2x512 LSTM checkpoint, written by the old code (so both can read it): one training step."""
    run_dir = work / "run"
    env = {**os.environ, "PYTHONPATH": str(old), "OMP_NUM_THREADS": "2"}
    cmd = [
        sys.executable,
        "-m",
        "charlm",
        "train",
        str(text_file),
        "--out",
        str(run_dir),
        "--rnn-size",
        "512",
        "--num-layers",
        "2",
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--batch-size",
        "8",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if run.returncode:
        raise RuntimeError(f"could not train the benchmark model:\n{run.stderr[-3000:]}")
    return run_dir / "last.safetensors"


def roofs(threads: int) -> dict:
    """The bandwidth roof of a 2x512 step in each dtype and kernel, in a process of the new code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bandwidth.py"), "--threads", str(threads), "--json"]
    if shutil.which("taskset") and threads <= (os.cpu_count() or 1):
        cmd = ["taskset", "-c", f"0-{threads - 1}"] + cmd
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--profile", action="store_true", help="the per-step breakdown of one-stream sampling, old and new, each dtype"
    )
    ap.add_argument("--what")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--size", type=int)
    ap.add_argument("--ckpt")
    ap.add_argument("--text-file")
    ap.add_argument("--old", default="HEAD", help="the old code's commit (default HEAD: the commit before uncommitted changes)")
    ap.add_argument("--old-dir", default="/tmp/one-stream-old")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", nargs="*", help="names of the cases to run (default: all)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every case's size (0.2 for a quick look)")
    ap.add_argument("--text", default=str(ROOT / "corpora" / "paulgraham" / "input.txt"))
    ap.add_argument("--out", help="write OUT.json and OUT.txt")
    args = ap.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        (profile_worker if args.profile else worker)(args)
        return {}
    old_dir = Path(args.old_dir)
    commit = ensure_old(args.old, old_dir)
    if args.profile:
        return profile(old_dir, commit, args)
    cases = [c for c in CASES if not args.cases or c[0] in args.cases]
    report: dict = {"old": commit, "new": "working tree of " + str(ROOT), "rounds": args.rounds, "cpu": _cpu(), "runs": {}}
    lines = [
        f"one stream, old ({commit}) vs new (this tree), 2x512 LSTM, median of {args.rounds} alternating rounds; {report['cpu']}"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text_file = work / "text.txt"
        text_file.write_text(Path(args.text).read_text()[:400_000])
        ckpt = make_model(old_dir, work, text_file)
        for threads in args.threads:
            roof = roofs(threads)
            results: dict = {c[0]: {"old": [], "new": []} for c in cases}
            for _ in range(args.rounds):
                for name, what, dtype, size in cases:
                    size = max(50, int(size * args.scale))
                    for side, code in (("old", old_dir), ("new", ROOT)):
                        results[name][side].append(run_worker(code, threads, what, dtype, size, ckpt, text_file))
            report["runs"][threads] = table = _summarise(results, roof)
            lines += _format(threads, table, roof)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        Path(args.out + ".txt").write_text(text + "\n")
    return report


def profile(old_dir: Path, commit: str, args) -> dict:
    """The per-step breakdown (profile_worker) in old and new code, each dtype, on the first --threads count."""
    threads = args.threads[0]
    report: dict = {}
    lines = [f"one-stream sampling step, 2x512 LSTM, {threads} thread(s), us of CPU per step (medians); {_cpu()}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text_file = work / "text.txt"
        text_file.write_text(Path(args.text).read_text()[:400_000])
        ckpt = make_model(old_dir, work, text_file)
        for dtype in ("fp32", "bf16", "int8"):
            for side, code in (("old", old_dir), ("new", ROOT)):
                env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    "--profile",
                    "--dtype",
                    dtype,
                    "--ckpt",
                    str(ckpt),
                    "--threads",
                    str(threads),
                ]
                if shutil.which("taskset") and threads <= (os.cpu_count() or 1):
                    cmd = ["taskset", "-c", f"0-{threads - 1}"] + cmd
                run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
                line = next((out for out in run.stdout.splitlines() if out.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(run.stderr[-3000:])
                r = report[f"{side} {dtype}"] = json.loads(line[7:])
                lines.append(f"\n{side} ({commit if side == 'old' else 'this tree'}) {dtype}:")
                for k, v in r.items():
                    if k != "operators":
                        lines.append(f"  {k:<32} {v if isinstance(v, str) else round(v, 1)}")
                lines.append("  operators per step: " + ", ".join(f"{k} {v}" for k, v in r["operators"].items()))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        Path(args.out + ".txt").write_text(text + "\n")
    return report


def _summarise(results: dict, roof: dict) -> dict:
    table = {}
    for name, sides in results.items():
        old = statistics.median(r["chars_per_s"] for r in sides["old"])
        new = statistics.median(r["chars_per_s"] for r in sides["new"])
        row = {"old_chars_per_s": round(old), "new_chars_per_s": round(new), "speedup": round(new / old, 2)}
        if name.startswith("sample") or name.startswith("beam"):
            dtype = name.split()[-1] if name.startswith("sample") else "fp32"
            for kernel in ("native", "torch"):
                r = roof["roof"][f"{dtype} {kernel}"]["chars_per_s"]
                if r:
                    row[f"roof_{kernel}"] = r
            top = row.get("roof_native") or row.get("roof_torch")
            row["old_share"], row["new_share"] = round(old / top, 2), round(new / top, 2)
        bpc = [(r.get("bits_per_char"), s) for s in ("old", "new") for r in sides[s]]
        if bpc[0][0] is not None:
            olds = [b for b, s in bpc if s == "old"]
            news = [b for b, s in bpc if s == "new"]
            row["bits_per_char_old"], row["bits_per_char_new"] = olds[0], news[0]
            row["bits_per_char_diff"] = abs(olds[0] - news[0])
        if name.startswith("sample"):
            row["same_text"] = sides["old"][0]["text_head"] == sides["new"][0]["text_head"]
        table[name] = row
    return table


def _format(threads: int, table: dict, roof: dict) -> list[str]:
    out = [
        f"\n{threads} thread(s). Roof = the step's weights through each dtype's product kernel alone "
        f"(benchmarks/bandwidth.py): "
        + ", ".join(f"{k} {v['chars_per_s']:,}/s" for k, v in roof["roof"].items() if v["chars_per_s"]),
        f"{'case':<20} {'old chars/s':>12} {'new chars/s':>12} {'new/old':>8} {'old/roof':>9} {'new/roof':>9}  note",
    ]
    for name, r in table.items():
        note = ""
        if "bits_per_char_diff" in r:
            note = f"bits/char differ by {r['bits_per_char_diff']:.1e}"
        if "same_text" in r:
            note = "same text" if r["same_text"] else "text differs"
        floor = FLOORS.get(name)
        if floor:
            note += f"; floor {floor}x: {'met' if r['speedup'] >= floor else 'NOT met'}"
        share = f"{r['old_share']:>9.0%} {r['new_share']:>9.0%}" if "new_share" in r else f"{'':>9} {'':>9}"
        out.append(f"{name:<20} {r['old_chars_per_s']:>12,} {r['new_chars_per_s']:>12,} {r['speedup']:>7.2f}x {share}  {note}")
    samples = {k: v for k, v in table.items() if k.startswith("sample")}
    if samples:
        fastest = max(samples, key=lambda k: samples[k]["new_chars_per_s"])
        r = samples[fastest]
        out.append(
            f"fastest dtype: {fastest}, {r['speedup']}x the old code's rate in that dtype (floor 2.5x: "
            f"{'met' if r['speedup'] >= 2.5 else 'NOT met'}); its roof allows {r.get('roof_native', 0) / max(r['old_chars_per_s'], 1):.1f}x"
        )
    return out


def _cpu() -> str:
    return f"{machine.cpu_model()}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
