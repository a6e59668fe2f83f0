"""Start-up time of the command line, before and after the lazy imports (issue 22), in one run.

    nice -n 5 python benchmarks/startup.py [--runs 10] [--old 3f7633e]

For each case (`charlm --version`, `charlm --help`, `charlm sample --help`, a shell-completion
request, `python -c "import charlm"`) it starts fresh processes, alternating the old code and the
new one so that both see the same machine load, and reports the median wall time of --runs each.
The old code is a git worktree of --old at /tmp/startup-old (made if missing); the new one is this
checkout, working tree included. Both run with this interpreter, from a neutral directory, with
PYTHONPATH naming their tree (checked: each run imports charlm from its own tree), as the
installed `charlm` script runs: `from charlm.cli import main; main()` with argv[0] = "charlm" (the
name shell completion keys on). Writes a markdown table to stdout and to
benchmarks/results/startup.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from charlm import machine  # torch-free: the CPU's name for the report

NEW = Path(__file__).resolve().parent.parent
OLD_DIR = Path("/tmp/startup-old")
RESULT = NEW / "benchmarks" / "results" / "startup.txt"

SCRIPT = "import sys; sys.argv[0] = 'charlm'; from charlm.cli import main; sys.exit(main())"  # the entry point's body
COMPLETION = {"_CHARLM_COMPLETE": "complete_bash", "COMP_WORDS": "charlm sa", "COMP_CWORD": "1"}
CASES = [  # (label, python arguments, extra environment, what stdout must contain)
    ("charlm --version", ["-c", SCRIPT, "--version"], {}, "charlm "),
    ("charlm --help", ["-c", SCRIPT, "--help"], {}, "Usage"),
    ("charlm sample --help", ["-c", SCRIPT, "sample", "--help"], {}, "Usage"),
    ("completion: charlm sa<Tab>", ["-c", SCRIPT], COMPLETION, "sample"),
    ('python -c "import charlm"', ["-c", "import charlm"], {}, ""),
]


def old_tree(commit: str) -> Path:
    """The old code as a git worktree (detached at `commit`), made once and reused."""
    if not (OLD_DIR / "charlm" / "__init__.py").exists():
        subprocess.run(
            ["git", "-C", str(NEW), "worktree", "add", "--detach", str(OLD_DIR), commit], check=True, capture_output=True
        )
    head = subprocess.run(["git", "-C", str(OLD_DIR), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True)
    if not commit.startswith(head.stdout.strip()) and not head.stdout.strip().startswith(commit):
        sys.exit(f"error: {OLD_DIR} is at {head.stdout.strip()}, not {commit}; remove it (git worktree remove {OLD_DIR})")
    return OLD_DIR


def environment(tree: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_CHARLM_COMPLETE", "COMP_"))}
    return {**env, "PYTHONPATH": str(tree), "COLUMNS": "100", **extra}


def check_imports_from(tree: Path, workdir: str) -> None:
    """Each tree's runs must import charlm from that tree, not from the editable install or the working directory."""
    done = subprocess.run(
        [sys.executable, "-c", "import charlm; print(charlm.__file__)"],
        cwd=workdir,
        env=environment(tree, {}),
        capture_output=True,
        text=True,
        check=True,
    )
    where = Path(done.stdout.strip()).resolve()
    if where != (tree / "charlm" / "__init__.py").resolve():
        sys.exit(f"error: with PYTHONPATH={tree}, charlm was imported from {where}")


def time_once(tree: Path, args: list[str], extra: dict[str, str], expect: str, workdir: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=workdir, env=environment(tree, extra), capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0 or expect not in done.stdout:
        sys.exit(f"error: {args} with {tree} failed (exit {done.returncode}): {done.stdout[-300:]} {done.stderr[-500:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per case and tree")
    parser.add_argument("--old", default="3f7633e", help="the commit before the lazy imports")
    args = parser.parse_args()

    old = old_tree(args.old)
    workdir = tempfile.mkdtemp(prefix="charlm-startup-")  # neither tree's directory: PYTHONPATH alone decides
    for tree in (old, NEW):
        check_imports_from(tree, workdir)
    rows = []
    for label, py_args, extra, expect in CASES:
        times: dict[str, list[float]] = {"old": [], "new": []}
        time_once(NEW, py_args, extra, expect, workdir)  # warm the page cache for both before timing
        time_once(old, py_args, extra, expect, workdir)
        for _ in range(args.runs):  # alternating, so that both see the same load
            times["old"].append(time_once(old, py_args, extra, expect, workdir))
            times["new"].append(time_once(NEW, py_args, extra, expect, workdir))
        before, after = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append(f"| {label} | {before:.3f} | {after:.3f} | {before / after:.1f}x |")
        print(f"{label}: {before:.3f} s -> {after:.3f} s", file=sys.stderr)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join(
        [
            f"# charlm start-up, before ({args.old}) and after (this tree), median of {args.runs} fresh processes",
            "",
            f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"- CPU: {machine.cpu_model()} ({os.cpu_count()} logical cores); load average at the end: {load:.2f}",
            f"- Python {platform.python_version()}; the old and new runs alternate; wall time of the whole process",
            "- command: nice -n 5 python benchmarks/startup.py",
            "",
            "| case | before (s) | after (s) | speed-up |",
            "|---|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    print(text)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)


if __name__ == "__main__":
    main()
