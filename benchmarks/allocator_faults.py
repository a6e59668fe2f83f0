"""Page faults and time per training step, with glibc's default allocator and with charlm's settings.

    python benchmarks/allocator_faults.py [--steps 12]

Each contender (the plain nn.LSTM loop, charlm fp32, charlm bf16; 2x512 LSTM, embed 64, batch 64 x
100, synthetic text) runs in its own process, once with CHARLM_MALLOC=system and once with
charlm's settings (charlm/allocator.py, applied first thing in the child). After three untimed
steps, the child reports the median time and the median minor page faults of `--steps` steps.
The contenders run one after another, not interleaved: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import resource, statistics, sys, tempfile, time
from pathlib import Path
from charlm.allocator import keep_freed_memory
keep_freed_memory()
import torch
from charlm.tools import bench
which, steps = sys.argv[1], int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    data = bench.synthetic_data(Path(tmp), 1_000_000)
    if which == "plain":
        step = bench.plain_step(data, 2, 512, 64, 64, 100)
    else:
        step = bench.charlm_step(data, 2, 512, 64, 64, 100, which, Path(tmp) / "out")
    for _ in range(3):
        step()
    times, faults = [], []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(statistics.median(times) * 1e3, statistics.median(faults), rss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    print(f"{'contender':<8} {'allocator':<8} {'ms/step':>8} {'faults/step':>12} {'peak RSS MiB':>13}")
    for which in ("plain", "fp32", "bf16"):
        ms = {}
        for malloc in ("system", "charlm"):
            env = {**os.environ, "CHARLM_MALLOC": malloc}
            out = subprocess.run(
                [sys.executable, "-c", CHILD, which, str(args.steps)], env=env, capture_output=True, text=True, check=True
            ).stdout.split()
            ms[malloc] = float(out[0])
            print(f"{which:<8} {malloc:<8} {ms[malloc]:>8.0f} {float(out[1]):>12,.0f} {int(out[2]):>13,}")
        print(f"{'':<8} {'':<8} {ms['system'] / ms['charlm']:>7.2f}x faster with charlm's settings")


if __name__ == "__main__":
    main()
