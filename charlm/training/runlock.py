"""One training run per run dir: an exclusive lock on OUT/.charlm-run.lock, held for the whole run.

Two trainings in one --out (a queue's retry, two terminals, `--resume auto` twice, `--overwrite` on
a live run) would write the same checkpoints and metrics, and one's start-up would remove the
other's save in progress. The lock is an flock on a file in OUT, taken before anything is written
there, and released by the OS when the process ends however it ends, so a run killed with -9 leaves
no stale lock: the next start takes it at once. The file holds the owner's pid, for the message the
second run prints. Readers (sample, eval, info, plot) never take it.

Taking it is also the first write into OUT, so an --out that cannot be written (read-only, no
permission, a dangling link, a file) is reported here, before any data is prepared or any step run.
Under `train --nproc` the launcher holds it; its ranks find it held by their launcher and go on.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from charlm.errors import CharlmError
from charlm.terminal import shown

LOCK_FILE = ".charlm-run.lock"
LAUNCHER_ENV = "CHARLM_LAUNCHER_PID"  # set by `charlm train --nproc` for its ranks: the pid that holds the lock for them


class RunInUse(CharlmError):
    """Another process trains in this run dir."""


@contextlib.contextmanager
def held(out: Path, allow_holder: int | None = None) -> Iterator[None]:
    """Hold OUT's lock for the body; a CharlmError if another process holds it (unless it is `allow_holder`:
    a rank's launcher) or OUT cannot be written. On the way out the lock file goes, and so does an OUT
    that this call created and nothing else wrote into (a run that failed before its first save)."""
    out = Path(out)
    created = _make_dir(out)
    try:
        fd = _acquire(out, allow_holder)
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield
    finally:
        if fd is not None:
            _release(out, fd)
        _remove_created(created)


def _make_dir(out: Path) -> list[Path]:
    """Create OUT (and missing parents); the dirs created, outermost last."""
    if out.is_symlink() and not out.exists():
        raise CharlmError(
            f"--out {shown(out)} is a symbolic link to {shown(os.readlink(out))}, which does not exist; "
            "create its target or give another --out"
        )
    if out.exists() and not out.is_dir():
        raise CharlmError(f"--out {shown(out)} is a file; give a directory for the run")
    created = []
    for d in [out, *out.parents]:
        if d.exists() or d.is_symlink():
            break
        created.append(d)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_created(created)
        raise CharlmError(f"cannot create --out {shown(out)}: {e.strerror or e}; choose another --out") from None
    return created


def _acquire(out: Path, allow_holder: int | None) -> int | None:
    """The locked file's descriptor; None when `allow_holder` holds it. The lock file may be removed by
    its last owner between our open and our lock: then the file we locked is not the one at the path,
    and we try again."""
    import fcntl

    path = out / LOCK_FILE
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise CharlmError(f"--out {shown(out)} is not writable ({e.strerror or e}); choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CharlmError(f"cannot lock --out {shown(out)} ({e.strerror or e}); choose another --out") from None
            if allow_holder is not None and holder == allow_holder:
                return None
            who = f"process {holder}" if holder else "another process"
            raise RunInUse(f"{shown(out)} is in use by {who}; wait or choose another --out") from None
        if _same_file(fd, path):
            try:
                _write_pid(fd)
                _check_run_files(out)
            except BaseException:
                _release(out, fd)
                raise
            return fd
        os.close(fd)
    raise CharlmError(f"cannot lock --out {shown(out)}: its lock file keeps changing; is another run starting there?")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _check_run_files(out: Path) -> None:
    """The run's own files must be writable too: metrics.jsonl is appended to (checkpoints are replaced by rename)."""
    from charlm.training.rundir import METRICS

    metrics = out / METRICS
    if metrics.exists() and not os.access(metrics, os.W_OK):
        raise CharlmError(f"{shown(metrics)} is not writable; make it writable (chmod u+w) or choose another --out")


def _release(out: Path, fd: int) -> None:
    """Remove the lock file, then unlock: a process that opened the old file finds it replaced (see _acquire)."""
    try:
        if _same_file(fd, out / LOCK_FILE):
            os.unlink(out / LOCK_FILE)
    except OSError:
        pass
    os.close(fd)


def _remove_created(created: list[Path]) -> None:
    """Remove the dirs this run created, innermost first, where nothing else was written into them."""
    for d in created:
        try:
            os.rmdir(d)
        except OSError:
            return
