"""Concatenate the source files of a tree or a tarball, in C-locale path order, into one stream.

This builds corpora like Karpathy's Linux one: every regular `*.c` / `*.h` file of a kernel tree,
in the order of `find . -type f \\( -name '*.c' -o -name '*.h' \\) | LC_ALL=C sort | xargs cat`.
That order is the byte order of the whole relative path, not a per-directory sort: '-' and '.'
come before '/', upper case before '_' before lower case.

A tarball is read as a stream (no unpacking to disk). Its members arrive in archive order, so the
matching files are first appended to a spool file (one temporary file plus an index of offsets),
then copied out in sorted order: memory stays at one chunk plus the index, whatever the size.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from charlm.errors import DataError

CHUNK = 1 << 22
EXTENSIONS = (".c", ".h")

Progress = Callable[[str, int, "int | None"], None]  # (phase, bytes done, bytes total or None)


@dataclass
class Concatenated:
    """What was written: how many files, how many bytes, and their sha256."""

    files: int
    bytes: int
    sha256: str


def parse_subset(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """'kernel,mm' -> ('kernel', 'mm'): top-level paths inside the tree; empty means the whole tree."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    subset = []
    for part in parts:
        p = part.strip().strip("/")
        while p.startswith("./"):
            p = p[2:]
        if not p:
            continue
        if any(c in ("", ".", "..") for c in p.split("/")):
            raise DataError(f"--subset entries are paths inside the tree like kernel or arch/x86 (got {part!r})")
        subset.append(p)
    return tuple(sorted(set(subset)))


def c_locale_key(rel: str) -> bytes:
    """Sort key of `LC_ALL=C sort`: the raw bytes of the path (undecodable bytes kept as they were)."""
    return os.fsencode(rel)


def concatenate(
    source: Path,
    out: BinaryIO,
    subset: Iterable[str] = (),
    extensions: Iterable[str] = EXTENSIONS,
    spool_dir: Path | None = None,
    progress: Progress | None = None,
) -> Concatenated:
    """Write the matching files of a directory or tarball to `out`, sorted by path; return counts and sha256.

    Raises CharlmError for a missing path, an unreadable or corrupt archive, or no matching file.
    """
    source = check_source(source)
    subset, extensions = parse_subset(subset), tuple(extensions)
    if source.is_dir():
        return _from_directory(source, out, subset, extensions, progress)
    return _from_tarball(source, out, subset, extensions, spool_dir, progress)


def check_source(source: str | Path) -> Path:
    """The source as a Path, if it is a directory or a file; else a CharlmError saying what to give."""
    source = Path(source)
    if not (source.is_dir() or source.is_file()):
        raise DataError(f"{source} does not exist (give a kernel source tree or a .tar.xz / .tar.gz / .tar tarball)")
    return source


def _selected(rel: str, subset: tuple[str, ...], extensions: tuple[str, ...]) -> bool:
    # find's -name '*.c' looks at the file name only, and its '*' also matches a leading dot.
    if not rel.rsplit("/", 1)[-1].endswith(extensions):
        return False
    return not subset or any(rel.startswith(s + "/") for s in subset)


def _nothing_found(source: Path, subset, extensions) -> DataError:
    where = f" under {', '.join(s + '/' for s in subset)}" if subset else ""
    kinds = " or ".join(f"*{e}" for e in extensions)
    hint = " (is it the top of the source tree?)" if subset else ""
    return DataError(f"no regular {kinds} files{where} in {source}{hint}")


# -- a directory -----------------------------------------------------------------------------
def _from_directory(root: Path, out: BinaryIO, subset, extensions, progress) -> Concatenated:
    def refuse(e: OSError):
        raise DataError(f"cannot read {e.filename}: {e.strerror}") from None

    found = []  # (key, path, size)
    # followlinks=False and lstat: like `find -type f`, symlinks (to files or dirs) are not followed.
    for dirpath, _dirs, names in os.walk(root, onerror=refuse):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not _selected(rel, subset, extensions):
                continue
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                found.append((c_locale_key(rel), path, st.st_size))
    if not found:
        raise _nothing_found(root, subset, extensions)
    found.sort()
    total = sum(size for _, _, size in found)
    writer = _HashingWriter(out, total, progress)
    for _, path, _size in found:
        with open(path, "rb") as f:
            writer.copy(f)
    return writer.result(len(found))


# -- a tarball -------------------------------------------------------------------------------
def _normalize(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _strip_top(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else ""


def _from_tarball(path: Path, out: BinaryIO, subset, extensions, spool_dir, progress) -> Concatenated:
    with open(path, "rb") as raw, tempfile.TemporaryFile(dir=spool_dir, prefix=".spool.") as spool:
        reader = _CountingReader(raw, path.stat().st_size, progress)
        index, top = _spool_members(path, reader, spool, subset, extensions)
        # Kernel tarballs keep everything under one directory (linux-6.1/): paths are taken relative
        # to it, as `find .` run inside the unpacked tree would see them.
        chosen = []
        for name, (offset, size) in index.items():
            rel = _strip_top(name) if top else name
            if rel and _selected(rel, subset, extensions):
                chosen.append((c_locale_key(rel), offset, size))
        if not chosen:
            raise _nothing_found(path, subset, extensions)
        chosen.sort()
        writer = _HashingWriter(out, sum(size for _, _, size in chosen), progress)
        for _, offset, size in chosen:
            spool.seek(offset)
            writer.copy(spool, size)
        return writer.result(len(chosen))


def _spool_members(path: Path, reader, spool, subset, extensions) -> tuple[dict[str, tuple[int, int]], bool]:
    """Append every candidate member to the spool; return {name: (offset, size)} and whether one top dir holds all."""
    index: dict[str, tuple[int, int]] = {}
    tops: set[str] = set()
    loose = False  # a non-directory member at the top level: then there is no common top dir
    gzipped = reader.raw.peek(2)[:2] == b"\x1f\x8b"
    try:
        # tarfile's own gzip reader never checks the CRC-32 in the gzip trailer, so a flipped byte
        # that still inflates would pass: gzip.GzipFile checks it, at the end of the stream.
        source = gzip.GzipFile(fileobj=reader, mode="rb") if gzipped else reader
        with tarfile.open(
            fileobj=source, mode="r|" if gzipped else "r|*", tarinfo=_StrictTarInfo
        ) as tar:  # '|': a forward-only stream
            while (member := tar.next()) is not None:
                tar.members.clear()  # a stream keeps every TarInfo otherwise (~80k for a kernel); none is looked up again
                name = _normalize(member.name)
                if not name:
                    continue
                tops.add(name.split("/", 1)[0])
                loose = loose or ("/" not in name and not member.isdir())
                # The top dir is known only at the end: keep members that match with or without it.
                if not (_selected(name, subset, extensions) or _selected(_strip_top(name), subset, extensions)):
                    continue
                if member.isfile():
                    index[name] = _append(spool, tar.extractfile(member), member.size)
                elif member.islnk():  # a hard link: the same bytes as a member already read
                    target = _normalize(member.linkname)
                    if target not in index:
                        raise DataError(
                            f"{path}: {member.name} is a hard link to {member.linkname}, which was not read; "
                            "unpack the tarball and pass the directory instead"
                        )
                    index[name] = index[target]
            # The end-of-archive blocks can come before the end of the compressed stream, and the
            # stream's integrity check (gzip's CRC-32, xz's CRC-64) sits at its very end: read on.
            while tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, _Damaged, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as e:
        hint = ""
        if path.suffix == ".deb":
            hint = "; a .deb holds the tarball: dpkg-deb -x FILE.deb pkg, then --from pkg/usr/src/linux-source-*.tar.xz"
        raise DataError(
            f"{path} is not a readable tarball (.tar.xz, .tar.gz, .tar.bz2 or .tar), or it is corrupt or "
            f"truncated: {e or type(e).__name__}{hint}"
        ) from None
    return index, len(tops) == 1 and not loose


class _Damaged(Exception):
    pass


class _StrictTarInfo(tarfile.TarInfo):
    """Header reading that treats a damaged or missing header as an error.

    In a stream, tarfile takes a bad header after the first member for the end of the archive, so a
    tarball cut at a member boundary would pass silently. Only a zero block is a proper end here.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise _Damaged(f"bad or missing header at byte {tar.offset:,} ({e})") from None


def _append(spool, src, size: int) -> tuple[int, int]:
    spool.seek(0, os.SEEK_END)
    offset = spool.tell()
    done = 0
    while chunk := src.read(min(CHUNK, size - done)):
        spool.write(chunk)
        done += len(chunk)
    if done != size:
        raise EOFError(f"member ends after {done} of {size} bytes")
    return offset, size


class _CountingReader:
    """A read-only file wrapper reporting how much of the (compressed) archive has been read."""

    def __init__(self, raw, total: int, progress):
        self.raw, self.total, self.progress, self.done, self.reported = raw, total, progress, 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.done += len(data)
        # tarfile reads 10 KiB records: report once per chunk's worth, not per record.
        if self.progress and (self.done - self.reported >= CHUNK or not data):
            self.reported = self.done
            self.progress("read", self.done, self.total)
        return data


class _HashingWriter:
    """Copies file contents to the output, hashing and counting as it goes."""

    def __init__(self, out: BinaryIO, total: int, progress):
        self.out, self.total, self.progress = out, total, progress
        self.sha, self.done = hashlib.sha256(), 0

    def copy(self, src, size: int | None = None) -> None:
        left = size
        while left is None or left > 0:
            chunk = src.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            self.sha.update(chunk)
            self.out.write(chunk)
            self.done += len(chunk)
            if left is not None:
                left -= len(chunk)
            if self.progress:
                self.progress("write", self.done, self.total)

    def result(self, files: int) -> Concatenated:
        return Concatenated(files=files, bytes=self.done, sha256=self.sha.hexdigest())
