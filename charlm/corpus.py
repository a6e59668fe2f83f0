"""Named corpora: registry files in corpora/, checksummed fetch from a local mirror or the URL."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

import charlm
from charlm import CharlmError

MIRROR_ENV = "CHARLM_CORPUS_MIRROR"
CORPORA_ENV = "CHARLM_CORPORA_DIR"
CHUNK = 1 << 22

Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


@dataclass
class CorpusEntry:
    name: str
    description: str
    url: str
    sha256: str
    bytes: int
    license: str
    source: str = ""


def corpora_dir() -> Path:
    """Where registry files live and corpora are fetched to.

    $CHARLM_CORPORA_DIR, else ./corpora when it holds registry files, else the checkout's corpora/
    (editable install), else ./corpora.
    """
    if os.environ.get(CORPORA_ENV):
        return Path(os.environ[CORPORA_ENV])
    here = Path.cwd() / "corpora"
    if any(here.glob("*.yaml")):
        return here
    checkout = Path(charlm.__file__).resolve().parents[1] / "corpora"
    if any(checkout.glob("*.yaml")):
        return checkout
    return here


def registry() -> dict[str, CorpusEntry]:
    entries = {}
    for path in sorted(corpora_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        try:
            entry = CorpusEntry(**{k: data[k] for k in CorpusEntry.__dataclass_fields__ if k in data})
        except TypeError as e:
            raise CharlmError(f"registry file {path} is incomplete: {e}") from None
        entries[entry.name] = entry
    return entries


def lookup(name: str) -> CorpusEntry:
    entries = registry()
    if name not in entries:
        known = ", ".join(entries) or "none"
        raise CharlmError(f"unknown corpus {name!r}; registered corpora: {known} (see: charlm corpus list)")
    return entries[name]


def corpus_path(name: str) -> Path:
    return corpora_dir() / name / "input.txt"


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, None)
    return h.hexdigest()


def get(name: str, mirror: str | Path | None = None, progress: Progress | None = None) -> Path:
    """Make corpora/NAME/input.txt present and verified; return its path.

    Tries the mirror (flag, then $CHARLM_CORPUS_MIRROR; layout DIR/NAME/input.txt), then the URL.
    The file appears only once its sha256 matches: it is written to a temp file and renamed.
    """
    entry = lookup(name)
    dest = corpus_path(name)
    if dest.exists() and sha256_file(dest) == entry.sha256:
        return dest
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror is not None:
        candidate = Path(mirror) / name / "input.txt"
        if candidate.is_file():
            with open(candidate, "rb") as src:
                _verified_copy(src, dest, entry, str(candidate), candidate.stat().st_size, progress)
            return dest
    try:
        with urllib.request.urlopen(entry.url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            _verified_copy(response, dest, entry, entry.url, total, progress)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        where = f" (mirror {mirror} has no {name}/input.txt)" if mirror else ""
        raise CharlmError(
            f"cannot download {name} from {entry.url}: {getattr(e, 'reason', e)}{where}. "
            f"Offline? Put the file at DIR/{name}/input.txt and pass --mirror DIR "
            f"(or set {MIRROR_ENV}=DIR), or copy it to {dest} yourself"
        ) from None
    return dest


def _verified_copy(src, dest: Path, entry: CorpusEntry, origin: str, total: int | None, progress) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".input.", suffix=".part")
    h = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != entry.sha256:
            raise CharlmError(
                f"checksum mismatch for {entry.name} from {origin}: expected sha256 {entry.sha256}, "
                f"got {h.hexdigest()} ({done:,} bytes); the file was not kept"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def describe(entry: CorpusEntry) -> dict:
    path = corpus_path(entry.name)
    return {
        "name": entry.name,
        "bytes": entry.bytes,
        "present": path.exists(),
        "description": entry.description,
        "license": entry.license,
    }
