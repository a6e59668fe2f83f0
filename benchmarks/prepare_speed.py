"""Speed and peak memory of `charlm prepare` on one file, e.g. the full Linux concatenation (issue 4).

    python benchmarks/prepare_speed.py corpora/linux/input.txt [--repeat 2] > prepare_speed.json

Runs `python -m charlm prepare FILE -o TMPDIR` as a child process, --repeat times, and reports for
each run the wall time, MB/s (10^6 bytes of input per second of wall time, interpreter start-up
included), prepare's own timing from meta.json, and the child's peak resident set size (from
os.wait4, so each run's own figure). The first run may read the file from disk, later ones from
the page cache: compare them. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(path: Path, out_dir: Path, extra: list[str]) -> dict:
    """One `charlm prepare` in a child process: wall seconds, prepare's seconds, peak RSS."""
    cmd = [sys.executable, "-m", "charlm", "prepare", str(path), "-o", str(out_dir), *extra]
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        # wait4 rather than Popen.wait: it also returns this child's own resource usage.
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            errors.seek(0)
            sys.exit(f"error: {' '.join(cmd)} failed (exit {code}): {errors.read().decode(errors='replace').strip()}")
    meta = json.loads((out_dir / "meta.json").read_text())
    size = path.stat().st_size
    return {
        "wall_seconds": round(wall, 3),
        "mb_per_s": round(size / 1e6 / wall, 1),
        "prepare_seconds": meta.get("seconds"),
        "prepare_mb_per_s": round(size / 1e6 / meta["seconds"], 1) if meta.get("seconds") else None,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path, help="the text to prepare")
    ap.add_argument("--repeat", type=int, default=1, help="runs, one after the other")
    ap.add_argument("--encoding", default=None, help="passed to charlm prepare (utf-8 or bytes)")
    args = ap.parse_args(argv)
    if not args.file.is_file():
        sys.exit(f"error: {args.file} does not exist")
    extra = ["--encoding", args.encoding] if args.encoding else []

    runs = []
    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as tmp:
        for i in range(args.repeat):
            runs.append(run_once(args.file, Path(tmp) / f"run{i}", extra))
            meta = json.loads((Path(tmp) / f"run{i}" / "meta.json").read_text())
    report = {
        "file": str(args.file),
        "bytes": args.file.stat().st_size,
        "chars": meta["source"]["chars"],
        "vocab_size": meta.get("vocab_size"),
        "runs": runs,
        "best_mb_per_s": max(r["mb_per_s"] for r in runs),
        "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
