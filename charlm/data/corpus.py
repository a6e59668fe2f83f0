"""Named corpora: a registry shipped in the package (charlm/data/corpora/*.yaml, plus any *.yaml in the
corpora dir), checksummed fetch from a local mirror or the URL, or a build from a source tree (the
Linux corpora: see sourcetree.py).

Fetching is our own ~60 lines rather than pooch: pooch would add requests and its own cache layout
yet still not know mirrors (DIR/NAME/input.txt), source-tree builds or size-only entries, and ours
already hashes while writing a temp file that is renamed only once verified. The per-user data dir
comes from platformdirs.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

import charlm
from charlm.data import sourcetree
from charlm.data.atomicdir import process_alive
from charlm.errors import DataError
from charlm.terminal import shown

MIRROR_ENV = "CHARLM_CORPUS_MIRROR"
CORPORA_ENV = "CHARLM_CORPORA_DIR"
CHUNK = 1 << 22

Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


@dataclass
class Recipe:
    """How a corpus is built from a source tree: which files, under which top-level paths."""

    extensions: tuple[str, ...] = sourcetree.EXTENSIONS  # file-name endings to take
    subset: tuple[str, ...] = ()  # paths inside the tree, e.g. ('kernel', 'mm'); () is the whole tree


@dataclass
class CorpusEntry:
    name: str
    description: str
    bytes: int
    license: str
    url: str | None = None  # one ready file to download; None: from a mirror (or built) only
    sha256: str | None = None  # None: no published checksum, only the size can be checked
    source: str = ""
    mirror_name: str | None = None  # its directory in a mirror (DIR/MIRROR_NAME/input.txt), when not NAME
    build: Recipe | None = None  # set: `charlm corpus get NAME --from TREE_OR_TARBALL` builds it

    @property
    def mirror_dir(self) -> str:
        return self.mirror_name or self.name


@dataclass
class Fetched:
    """The outcome of a get: where the corpus is and what was checked."""

    path: Path
    sha256: str | None  # None only for a file already present that has no checksum to compare
    bytes: int
    verified: bool  # True: the sha256 matched the registered one
    origin: str  # 'already present', the mirror file, the URL or the source tree
    files: int | None = None  # for a build: how many source files went in
    registered: bool = True  # False: a custom --subset, written to --out, not the registered corpus


def corpora_dir() -> Path:
    """Where fetched corpora (NAME/input.txt), extra registry files and the prepare cache (.cache/) go."""
    return corpora_location()[0]


def corpora_location() -> tuple[Path, str]:
    """The corpora dir and why it was chosen, first match wins:

    $CHARLM_CORPORA_DIR (also set by `charlm --corpora-dir DIR`); else ./corpora when the current
    directory is a charlm checkout (its pyproject.toml names charlm) or already has a corpora/ dir;
    else the corpora/ of the checkout the package runs from (an editable install); else the
    per-user data dir, platformdirs.user_data_dir("charlm")/corpora (~/.local/share/charlm/corpora).
    """
    if os.environ.get(CORPORA_ENV):
        return Path(os.environ[CORPORA_ENV]), f"from --corpora-dir or ${CORPORA_ENV}"
    here = Path.cwd()
    if _is_checkout(here) or (here / "corpora").is_dir():
        return here / "corpora", "./corpora of the current directory"
    checkout = Path(charlm.__file__).resolve().parents[1]
    if _is_checkout(checkout):
        return checkout / "corpora", "the checkout charlm runs from"
    import platformdirs  # only here: most runs never get this far

    return Path(platformdirs.user_data_dir("charlm")) / "corpora", "the per-user data dir: not in a checkout"


def _is_checkout(path: Path) -> bool:
    """A charlm source tree: its pyproject.toml names the project charlm."""
    try:
        text = (path / "pyproject.toml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r'(?m)^name\s*=\s*["\']charlm["\']', text) is not None


def registry_files() -> dict[str, tuple[str, str]]:
    """{file name: (where it came from, its YAML text)}: the packaged entries, then *.yaml in the
    corpora dir, which add corpora or replace a packaged file of the same name."""
    files = {}
    for res in sorted(resources.files("charlm.data").joinpath("corpora").iterdir(), key=lambda r: r.name):
        if res.name.endswith(".yaml"):
            files[res.name] = (f"charlm/data/corpora/{res.name} (packaged)", res.read_text(encoding="utf-8"))
    for path in sorted(corpora_dir().glob("*.yaml")):
        try:
            files[path.name] = (str(path), path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read registry file {path}: {e}") from None
    return files


def registry() -> dict[str, CorpusEntry]:
    """Every registered corpus (packaged, then the corpora dir's *.yaml), by corpus name."""
    entries = {}
    for where, text in registry_files().values():
        try:
            data = yaml.safe_load(text) or {}
            fields = {k: data[k] for k in CorpusEntry.__dataclass_fields__ if k in data}
            if fields.get("build") is not None:
                fields["build"] = _recipe(fields["build"])
            entry = CorpusEntry(**fields)
        except (TypeError, AttributeError, yaml.YAMLError) as e:
            raise DataError(f"registry file {where} is incomplete or malformed: {_yaml_problem(e)}") from None
        entries[entry.name] = entry
    return entries


def _yaml_problem(e: Exception) -> str:
    """A YAML error (or a missing field) as one short line."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def _recipe(data: dict) -> Recipe:
    recipe = Recipe(subset=sourcetree.parse_subset(data.get("subset") or ()))
    if data.get("extensions"):
        recipe.extensions = tuple(str(e) for e in data["extensions"])
    return recipe


def lookup(name: str) -> CorpusEntry:
    """The registry entry for NAME, or a CharlmError listing the registered names."""
    entries = registry()
    if name not in entries:
        known = ", ".join(entries) or "none"
        raise DataError(f"unknown corpus {name!r}; registered corpora: {known} (see: charlm corpus list)")
    return entries[name]


def corpus_path(name: str) -> Path:
    """Where a registered corpus lives once fetched: corpora/NAME/input.txt."""
    return corpora_dir() / name / "input.txt"


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """The hex sha256 of a file, read in chunks."""
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
    """Make corpora/NAME/input.txt present and verified; return its path (see fetch)."""
    return fetch(name, mirror, progress).path


def fetch(name: str, mirror: str | Path | None = None, progress: Progress | None = None) -> Fetched:
    """Make corpora/NAME/input.txt present and verified, and say how.

    Tries the mirror (flag, then $CHARLM_CORPUS_MIRROR; layout DIR/MIRROR_NAME/input.txt), then the URL.
    The file appears only once its sha256 matches (its size, for an entry without a checksum): it
    is written to a temp file and renamed.
    """
    entry = lookup(name)
    dest = corpus_path(name)
    present = _already_present(entry, dest)
    if present:
        return present
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror is not None:
        candidate = Path(mirror) / entry.mirror_dir / "input.txt"
        if candidate.is_file():
            with open(candidate, "rb") as src:
                return _verified_copy(src, dest, entry, str(candidate), candidate.stat().st_size, progress)
    where = f"mirror {mirror} has no {entry.mirror_dir}/input.txt" if mirror else ""
    if entry.url is None:
        raise DataError(_no_url(entry, where))
    try:
        with urllib.request.urlopen(entry.url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            return _verified_copy(response, dest, entry, entry.url, total, progress)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataError(
            f"cannot download {name} from {entry.url}: {getattr(e, 'reason', e)}{f' ({where})' if where else ''}. "
            f"Offline? Put the file at DIR/{entry.mirror_dir}/input.txt and pass --mirror DIR "
            f"(or set {MIRROR_ENV}=DIR), or copy it to {dest} yourself"
        ) from None


def _already_present(entry: CorpusEntry, dest: Path) -> Fetched | None:
    if not dest.is_file():
        return None
    if entry.sha256 is None:
        # Nothing to hash against: the size is the check (hashing 1 GB on every use would buy nothing).
        size = dest.stat().st_size
        return Fetched(dest, None, size, False, "already present") if size == entry.bytes else None
    sha = sha256_file(dest)
    return Fetched(dest, sha, dest.stat().st_size, True, "already present") if sha == entry.sha256 else None


def _no_url(entry: CorpusEntry, where: str) -> str:
    mirror_hint = f"put it at DIR/{entry.mirror_dir}/input.txt and pass --mirror DIR (or set {MIRROR_ENV}=DIR)"
    if entry.build is not None:
        how = f"build it with: charlm corpus get {entry.name} --from PATH (a kernel source tree or .tar.xz/.tar.gz tarball), or {mirror_hint}"
    else:
        how = f"it must come from a mirror: {mirror_hint}"
    return f"{entry.name} has no single-file download URL{f' and {where}' if where else ''}; {how}"


def _verified_copy(src, dest: Path, entry: CorpusEntry, origin: str, total: int | None, progress) -> Fetched:
    fd, tmp = _temp_beside(dest)
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
        if entry.sha256 is not None and h.hexdigest() != entry.sha256:
            raise DataError(
                f"checksum mismatch for {entry.name} from {origin}: expected sha256 {entry.sha256}, "
                f"got {h.hexdigest()} ({done:,} bytes); the file was not kept"
            )
        if entry.sha256 is None and done != entry.bytes:
            raise DataError(
                f"size mismatch for {entry.name} from {origin}: expected {entry.bytes:,} bytes (there is no "
                f"published sha256 to check), got {done:,}; the file was not kept"
            )
        _publish(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Fetched(dest, h.hexdigest(), done, entry.sha256 is not None, origin)


def build(
    name: str,
    source: str | Path,
    subset: str | None = None,
    out: str | Path | None = None,
    progress: sourcetree.Progress | None = None,
) -> Fetched:
    """Build corpus NAME by concatenating a source tree or tarball (its recipe's files, sorted by path).

    The registered subset unless `subset` ('a,b') says otherwise; a custom subset is not the
    registered corpus, so it needs `out`. Written to a temp file beside the destination and renamed
    once the sha256 matches (or, with no published checksum, once complete).
    """
    entry = lookup(name)
    if entry.build is None:
        buildable = ", ".join(e.name for e in registry().values() if e.build) or "none"
        raise DataError(f"{name} is not built from a source tree; --from applies to: {buildable}")
    chosen = entry.build.subset if subset is None else sourcetree.parse_subset(subset)
    registered = chosen == entry.build.subset
    if not registered and out is None:
        raise DataError(_custom_subset(entry, chosen))
    sourcetree.check_source(source)
    dest = Path(out) if out is not None else corpus_path(name)
    if registered and out is None:
        present = _already_present(entry, dest)
        if present and present.verified:
            return present
    fd, tmp = _temp_beside(dest)
    try:
        with os.fdopen(fd, "wb") as f:
            # The spool (tarballs only) goes beside the output: same disk, and never in a small /tmp.
            made = sourcetree.concatenate(source, f, chosen, entry.build.extensions, dest.parent, progress)
            f.flush()
            os.fsync(f.fileno())
        verified = registered and entry.sha256 is not None
        if verified and made.sha256 != entry.sha256:
            raise DataError(
                f"checksum mismatch for {name} built from {source}: expected sha256 {entry.sha256}, got "
                f"{made.sha256} ({made.files:,} files, {made.bytes:,} bytes; registered: {entry.bytes:,} bytes). "
                f"Is it the kernel version the registry names ({entry.source})? The file was not kept"
            )
        _publish(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Fetched(dest, made.sha256, made.bytes, verified, str(source), made.files, registered)


def _temp_beside(dest: Path) -> tuple[int, str]:
    """A hidden temp file beside `dest` (same disk: renamed into place when verified), named with this
    process's pid: the temp files of fetches that were killed (their pid gone) are removed first, while a
    fetch still running elsewhere keeps its own."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{_short(dest.name)}.part-"
        for stale in dest.parent.iterdir():
            pid = stale.name[len(prefix) :].split(".")[0] if stale.name.startswith(prefix) else ""
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                stale.unlink(missing_ok=True)
        return tempfile.mkstemp(dir=dest.parent, prefix=f"{prefix}{os.getpid()}.")
    except OSError as e:
        where = shown(dest.parent)
        raise DataError(f"cannot write to {where} ({e.strerror or e}); give a writable --corpora-dir (or --out)") from None


def _short(name: str) -> str:
    """A name with room for a temp file's suffixes within the 255 bytes a name may have."""
    return name if len(os.fsencode(name)) <= 180 else os.fsencode(name)[:120].decode("utf-8", "ignore") + "~"


def _publish(tmp: str, dest: Path) -> None:
    """Give the finished temp file the usual permissions (mkstemp makes it owner-only) and rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dest)


def _custom_subset(entry: CorpusEntry, chosen: tuple[str, ...]) -> str:
    same = [e.name for e in registry().values() if e.build and e.build.subset == chosen]
    hint = f" (that is the registered corpus {same[0]}: charlm corpus get {same[0]} --from PATH)" if same else ""
    return (
        f"--subset {','.join(chosen) or '(whole tree)'} differs from the registered {entry.name} corpus "
        f"({','.join(entry.build.subset) or 'the whole tree'}); give --out FILE to write it elsewhere{hint}"
    )


def describe(entry: CorpusEntry) -> dict:
    """A registry entry as a row for `charlm corpus list`."""
    path = corpus_path(entry.name)
    how = "url or mirror" if entry.url else "mirror"
    if entry.build is not None:
        how += " or --from TREE"
    return {
        "name": entry.name,
        "bytes": entry.bytes,
        "present": path.exists(),
        "get": how,
        "description": entry.description,
        "license": entry.license,
    }
