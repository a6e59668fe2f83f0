"""Checkpoint fuzzer: thousands of corrupted and hostile checkpoints through load, info, sample, eval and --resume.

    python benchmarks/fuzz_checkpoints.py [--cases 2600] [--seed 12] [--cli-every 1] [--json out.json]

Cases come from tests/fuzzcases.py (the same generator the test suite runs a few hundred of): byte
flips in the header, the metadata and the data, truncations, header lengths, foreign files,
hostile JSON (deep nesting, 5,000-digit numbers, NaN, duplicate keys), wrong structure, types,
names, dtypes, shapes, model and training configs, vocabularies against the output size and the
tokenizer, training states, non-finite and altered weights, checksums, and valid re-encodings.
Each must end in a clean error (one "error: " line, exit 1) or in a success identical to the good
file it came from. Prints a totals table; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzzcases  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2600)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--cli-every", type=int, default=1, help="run every Nth case through the CLI too (1: all; 0: none)")
    ap.add_argument("--json", type=Path, help="also write the totals here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="charlm-fuzz-") as tmp:
        root = Path(tmp)
        os.environ["CHARLM_CORPORA_DIR"] = str(root / "corpora")  # nothing outside the temp dir is touched
        t0 = time.perf_counter()
        bases = fuzzcases.make_bases(root / "bases")
        runner = fuzzcases.Runner(root, bases)
        setup = time.perf_counter() - t0

        def progress(i: int) -> None:
            if (i + 1) % 250 == 0:
                print(f"  {i + 1:,} cases ...", file=sys.stderr, flush=True)

        totals, wall = fuzzcases.run_cases(runner, args.seed, args.cases, args.cli_every, progress)
    failures = sum(totals.failures.values())
    rows = [
        ("cases", f"{totals.cases:,}"),
        ("clean errors", f"{totals.clean:,}"),
        ("successes identical to the good file", f"{totals.success:,}"),
        ("successes on valid files that differ from it", f"{totals.other:,}"),
        ("failures", f"{failures:,}"),
        *[(f"  {cls}", f"{n:,}") for cls, n in sorted(totals.failures.items())],
        ("CLI command runs (info, sample, eval, train --resume)", f"{totals.commands:,}"),
        ("base checkpoints", ", ".join(bases)),
        ("setup (train the bases, run them once)", f"{setup:.1f} s"),
        ("wall time of the cases", f"{wall:.1f} s ({wall / max(totals.cases, 1) * 1000:.0f} ms a case)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"charlm checkpoint fuzzer: seed {args.seed}, {args.cases:,} cases, CLI on every {args.cli_every or 'no'} case(s)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  by family (clean / success / failure):")
    for family, (c, s, f) in totals.families.items():
        print(f"    {family:<14} {c:>5} {s:>5} {f:>5}")
    for index, family, base, note, detail in totals.examples[:20]:
        print(f"  FAIL case {index} ({family}, {base}: {note}): {detail}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "cases": totals.cases,
                    "clean": totals.clean,
                    "success": totals.success,
                    "other": totals.other,
                    "failures": totals.failures,
                    "commands": totals.commands,
                    "wall_s": wall,
                    "families": totals.families,
                    "examples": totals.examples,
                },
                indent=1,
            )
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
