"""A directory replaced as a whole: built beside the old one and swapped in only when complete.

`charlm prepare` writes its output this way, so a failure (bad options found late, a full disk,
Ctrl-C, an input that changed) leaves the previous prepared dir exactly as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from charlm.errors import DataError
from charlm.terminal import shown

MARK = ".building-"  # hidden work dirs: .NAME.building-PID-XXXX


@contextlib.contextmanager
def building(target: Path, replaceable: Iterable[str]) -> Iterator[Path]:
    """Yield an empty work dir beside `target`; on success it becomes `target`, on any failure it is removed.

    An existing `target` is replaced only if it holds nothing but the names in `replaceable` (the
    files this kind of dir is made of), so a user's directory of other files is never swapped away.
    """
    target = Path(target)
    _check_replaceable(target, set(replaceable))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    work = target.with_name(f"{_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    try:
        yield work
        _swap_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _prefix(target: Path) -> str:
    """The hidden work dirs' common prefix: .NAME.building- for a name that leaves room for the suffixes
    within the 255 bytes a name may have; a long NAME is cut and a hash of it added."""
    name = target.name
    if len(os.fsencode(name)) > 180:
        name = f"{os.fsencode(name)[:120].decode('utf-8', 'ignore')}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"
    return f".{name}{MARK}"


def _check_replaceable(target: Path, replaceable: set[str]) -> None:
    if target.is_symlink() and not target.exists():
        raise DataError(
            f"{shown(target)} is a symbolic link to {shown(os.readlink(target))}, which does not exist; "
            "create its target or write elsewhere"
        )
    if not target.exists():
        return
    if not target.is_dir():
        raise DataError(f"{shown(target)} is a file; give a directory to write to")
    others = sorted(name for name in os.listdir(target) if name not in replaceable)
    if others:
        listed = ", ".join(shown(n) for n in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise DataError(
            f"{shown(target)} holds other files ({listed}) and would be replaced as a whole; give a new or empty directory"
        )


def _swap_in(work: Path, target: Path) -> None:
    """Rename work to target; an old target is moved aside first and removed after."""
    if not target.exists():
        os.replace(work, target)
        return
    old = target.with_name(f"{_prefix(target)}{os.getpid()}-old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(work, target)
    shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned(target: Path) -> None:
    """Work dirs beside target left by processes that no longer run (killed mid-build)."""
    prefix = _prefix(target)
    for stale in target.parent.iterdir():
        if not stale.name.startswith(prefix):
            continue
        try:
            pid = int(stale.name[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts: it cannot be signalled, but it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
