"""A training run's directory (--out): what a new run may replace, and its metrics log.

RUN_DIR holds last.safetensors (resumable), best.safetensors (the file to share) and
metrics.jsonl (one JSON record per progress report and per validation). A new run never writes
over another run's files by accident: it needs --resume (continue it) or --overwrite (replace it).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from charlm import checkpoint
from charlm.errors import CharlmError
from charlm.jsonsafe import finite_or_null
from charlm.terminal import shown

METRICS = "metrics.jsonl"
LAST, BEST = "last.safetensors", "best.safetensors"
RUN_FILES = (LAST, BEST, METRICS)


def claim(out: Path, resuming: bool, overwrite: bool) -> None:
    """Make `out` ready for this run: refuse another run's files unless resuming or told to overwrite.

    Also removes the hidden .part files a save killed mid-write leaves behind. Called under the run
    dir's lock (runlock.py), so that neither the replacing nor the cleaning touches a live run's files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CharlmError(f"--out {shown(out)} is a file; give a directory for the run")
    theirs = [name for name in RUN_FILES if (out / name).exists()]
    if theirs and not resuming:
        if not overwrite:
            raise CharlmError(
                f"{shown(out)} holds another run ({', '.join(theirs)}); continue it with --resume {shown(out / LAST)} "
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
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():  # a torn byte stays the byte it was
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
        try:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8", errors="surrogateescape")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CharlmError(_write_failed(path, e)) from None
    return dropped


def append_record(out: Path, record: dict) -> None:
    """One record as one line; non-finite figures are written as null, so every line is valid JSON.

    Paths in a record (out_dir) that are not UTF-8 are written as JSON escapes (ensure_ascii), so the
    log stays valid UTF-8 and reads back to the same path."""
    path = Path(out) / METRICS
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
    except OSError as e:
        raise CharlmError(_write_failed(path, e)) from None


def _write_failed(path: Path, e: OSError) -> str:
    where = shown(path)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device holding {where}; free space or choose another --out; the checkpoints are intact"
    return f"cannot write {where} ({e.strerror or e}); make it writable or choose another --out; the checkpoints are intact"
