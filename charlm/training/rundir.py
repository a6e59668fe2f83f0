"""A training run's directory (--out): what a new run may replace, and its metrics log.

RUN_DIR holds last.safetensors (resumable), best.safetensors (the file to share) and
metrics.jsonl (one JSON record per progress report and per validation). A new run never writes
over another run's files by accident: it needs --resume (continue it) or --overwrite (replace it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from charlm import checkpoint
from charlm.errors import CharlmError
from charlm.jsonsafe import finite_or_null

METRICS = "metrics.jsonl"
LAST, BEST = "last.safetensors", "best.safetensors"
RUN_FILES = (LAST, BEST, METRICS)


def claim(out: Path, resuming: bool, overwrite: bool) -> None:
    """Make `out` ready for this run: refuse another run's files unless resuming or told to overwrite.

    Also removes the hidden .part files a save killed mid-write leaves behind.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CharlmError(f"--out {out} is a file; give a directory for the run")
    theirs = [name for name in RUN_FILES if (out / name).exists()]
    if theirs and not resuming:
        if not overwrite:
            raise CharlmError(
                f"{out} holds another run ({', '.join(theirs)}); continue it with --resume {out / LAST} "
                "(or --resume auto), choose another --out, or replace it with --overwrite"
            )
        for name in theirs:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_parts(out)


def continue_metrics(out: Path, step: int) -> int:
    """On resume from `step`: keep the log's records up to that step and drop the rest; returns how many were dropped.

    The records after the checkpoint's step describe steps the resumed run takes again (the
    process that wrote them was stopped before its next save), and a torn last line (killed mid-
    write) is not a record: both go, so the log reads as one run. Rewritten atomically.
    """
    path = Path(out) / METRICS
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += bool(line.strip())
    if dropped:
        tmp = path.with_name(f".{METRICS}.part")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def append_record(out: Path, record: dict) -> None:
    """One record as one line; non-finite figures are written as null, so every line is valid JSON."""
    with open(Path(out) / METRICS, "a") as f:
        f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
