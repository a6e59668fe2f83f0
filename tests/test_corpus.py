"""Corpus registry and builds from a source tree or tarball: C-locale order, streaming, clean failures."""

import gzip
import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import assert_clean_error, run

from charlm import CharlmError
from charlm.data import corpus, sourcetree

PACKAGED = Path(corpus.__file__).parent / "corpora"  # the registry shipped in the package
SHARED_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "corpora"

# Relative paths chosen so that C-locale (byte) order differs from a per-component sort ('-' and
# '.' sort before '/'), from a case-insensitive sort ('B' < 'Z' < '_' < 'a'), and so that '.', '_'
# and '-' inside names matter.
SELECTED_IN_ORDER = [
    "drivers/d.c",
    "include/linux/k.h",
    "kernel-old/a.c",
    "kernel/.hidden.c",
    "kernel/B.h",
    "kernel/Zeta.c",
    "kernel/a-b.c",
    "kernel/a.b.c",
    "kernel/a.c",
    "kernel/a_b.c",
    "kernel/ab.c",
    "kernel/alpha.c",
    "kernel/bpf-x.c",
    "kernel/bpf.h",
    "kernel/bpf/core.c",
    "kernel/dir.c/inner.h",
    "kernel/hard.c",  # a hard link to kernel/alpha.c: a regular file to find, a link member in a tarball
    "mm/x.h",
]
NOT_SELECTED = ["Kconfig", "kernel/notes.txt", "kernel/Makefile", "mm/x.h.orig", "kernel/c"]


def make_tree(root: Path) -> Path:
    """A small kernel-like tree: tricky names, a symlink (not taken), a hard link (taken), non-C files."""
    for rel in SELECTED_IN_ORDER + NOT_SELECTED:
        if rel == "kernel/hard.c":
            continue
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"/* {rel} */\nint x;\n".encode() + b"\xc2\xa9 caf\xc3\xa9\n" * (len(rel) % 3))
    os.link(root / "kernel/alpha.c", root / "kernel/hard.c")
    os.symlink("a.c", root / "kernel/link.c")  # `find -type f` does not list symlinks
    os.symlink("../mm", root / "kernel/mmlink")  # nor descend into symlinked directories
    (root / "kernel/big.txt").write_bytes(b"x" * 5000)
    return root


def expected_bytes(root: Path, subset=()) -> bytes:
    rels = [r for r in SELECTED_IN_ORDER if not subset or any(r.startswith(s + "/") for s in subset)]
    return b"".join((root / r).read_bytes() for r in rels)


def make_tarball(root: Path, dest: Path, top: str | None = "linux-6.1", seed: int = 0) -> Path:
    """Members in shuffled order (a tarball is not sorted); under one top dir, or './' when top is None."""
    paths = sorted(p for p in root.rglob("*"))
    random.Random(seed).shuffle(paths)
    mode = {".xz": "w:xz", ".gz": "w:gz"}.get(dest.suffix, "w")
    with tarfile.open(dest, mode) as tar:
        tar.add(root, arcname=top or ".", recursive=False)
        for p in paths:
            rel = p.relative_to(root).as_posix()
            tar.add(p, arcname=f"{top}/{rel}" if top else f"./{rel}", recursive=False)
    return dest


def build(source, subset=(), spool_dir=None, progress=None):
    out = io.BytesIO()
    made = sourcetree.concatenate(source, out, subset, spool_dir=spool_dir, progress=progress)
    return out.getvalue(), made


def register(corpora: Path, name: str, content: bytes | None, subset=(), extra: str = "") -> None:
    """A registry entry built from a tree; content None registers no checksum (like linux)."""
    sha = hashlib.sha256(content).hexdigest() if content is not None else "null"
    size = len(content) if content is not None else 123
    build = "build:\n  extensions: [.c, .h]\n" + (f"  subset: [{', '.join(subset)}]\n" if subset else "")
    (corpora / f"{name}.yaml").write_text(
        f"name: {name}\ndescription: test\nurl: null\nsha256: {sha}\nbytes: {size}\nlicense: GPL-2.0\n{extra}{build}"
    )


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "src" / "linux-6.1")


# -- order -----------------------------------------------------------------------------------
def test_c_locale_order_is_byte_order_of_the_whole_path():
    rels = list(SELECTED_IN_ORDER)
    random.Random(1).shuffle(rels)
    assert sorted(rels, key=sourcetree.c_locale_key) == SELECTED_IN_ORDER
    # The test names are chosen so that the usual wrong sorts give another order.
    assert sorted(rels, key=lambda r: Path(r).parts) != SELECTED_IN_ORDER
    assert sorted(rels, key=str.lower) != SELECTED_IN_ORDER


def test_the_published_linux_core_file_list_is_in_this_order():
    files = SHARED_MIRROR / "linux" / "FILES.txt"
    if not files.exists():
        pytest.skip("no shared mirror with linux/FILES.txt")
    rels = [line.split("/", 1)[1] for line in files.read_text().splitlines() if line]
    assert len(rels) == 669
    assert rels == sorted(rels, key=sourcetree.c_locale_key)


def test_directory_matches_find_sort_xargs_cat(tree):
    data, made = build(tree)
    assert data == expected_bytes(tree)
    assert made.files == len(SELECTED_IN_ORDER) and made.bytes == len(data)
    assert made.sha256 == hashlib.sha256(data).hexdigest()
    if shutil.which("find") and shutil.which("xargs"):
        # The recipe in the mirror's linux/SOURCE.md, run as written.
        shell = "find . -type f \\( -name '*.c' -o -name '*.h' \\) | LC_ALL=C sort | xargs cat"
        assert subprocess.run(shell, shell=True, cwd=tree, capture_output=True, check=True).stdout == data


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.xz"])
@pytest.mark.parametrize("top", ["linux-6.1", None])
def test_tarball_equals_directory(tree, tmp_path, suffix, top, monkeypatch):
    monkeypatch.setattr(sourcetree, "CHUNK", 7)  # many chunk boundaries inside every file
    tarball = make_tarball(tree, tmp_path / f"linux{suffix}", top=top)
    spool = tmp_path / "spool"
    spool.mkdir()
    phases = set()
    data, made = build(tarball, spool_dir=spool, progress=lambda phase, done, total: phases.add(phase))
    assert data == expected_bytes(tree)
    assert made.files == len(SELECTED_IN_ORDER)
    assert phases == {"read", "write"}
    assert list(spool.iterdir()) == []  # the spool is an anonymous temp file, gone when done
    sub, _ = build(tarball, subset=("kernel", "mm"))
    assert sub == expected_bytes(tree, ("kernel", "mm"))


def test_subset_selects_whole_path_components(tree):
    data, made = build(tree, subset="kernel/bpf,mm/")
    assert data == b"".join((tree / r).read_bytes() for r in ("kernel/bpf/core.c", "mm/x.h"))
    assert sourcetree.parse_subset(" mm, kernel ,./kernel/") == ("kernel", "mm")
    with pytest.raises(CharlmError, match="paths inside the tree"):
        sourcetree.parse_subset("kernel/../etc")


# -- errors ------------------------------------------------------------------------------------
def test_gzip_checksum_is_checked(tree, tmp_path):
    """tarfile alone never reads the CRC-32 at the end of a gzip stream: a wrong one must be an error."""
    whole = bytearray(make_tarball(tree, tmp_path / "t.tar.gz").read_bytes())
    whole[-8] ^= 0xFF  # the trailer: CRC-32, then the size
    (tmp_path / "badcrc.tar.gz").write_bytes(bytes(whole))
    with pytest.raises(CharlmError, match="corrupt or truncated"):
        build(tmp_path / "badcrc.tar.gz")


def test_build_errors_are_clear(tree, tmp_path):
    with pytest.raises(CharlmError, match="does not exist"):
        build(tmp_path / "missing")
    with pytest.raises(CharlmError, match=r"no regular \*\.c or \*\.h files under nosuch/"):
        build(tree, subset="nosuch")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README").write_text("no C here\n")
    with pytest.raises(CharlmError, match="no regular"):
        build(docs)
    junk = tmp_path / "junk.tar.xz"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CharlmError, match="not a readable tarball"):
        build(junk)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(CharlmError, match="not a readable tarball"):
        build(empty)
    whole = make_tarball(tree, tmp_path / "t.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CharlmError, match="corrupt or truncated"):
        build(cut)
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    (tmp_path / "flipped.tar.gz").write_bytes(bytes(flipped))
    with pytest.raises(CharlmError, match="corrupt or truncated"):
        build(tmp_path / "flipped.tar.gz")


def test_plain_tar_cut_at_a_member_boundary_is_an_error(tree, tmp_path):
    # tarfile alone reads such a stream as a shorter, complete archive; a build must not.
    plain = make_tarball(tree, tmp_path / "t.tar")
    with tarfile.open(plain) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(plain.read_bytes()[: offsets[len(offsets) // 2]])
    with pytest.raises(CharlmError, match="corrupt or truncated.*bad or missing header"):
        build(cut)


# -- registry and `charlm corpus get` ----------------------------------------------------------
def test_shipped_registry_entries(isolated_corpora):
    assert sorted(p.name for p in PACKAGED.glob("*.yaml")) == [
        "linux-core.yaml",
        "linux.yaml",
        "paulgraham.yaml",
        "shakespeare.yaml",
    ]
    entries = corpus.registry()  # from the package: the corpora dir is empty
    assert {"shakespeare", "paulgraham", "linux", "linux-core"} <= set(entries)
    core, full, pg = entries["linux-core"], entries["linux"], entries["paulgraham"]
    assert core.sha256 == "99abeba3d51e81dc5604c145a7a68a75631f9fdfc2b7abe53cd2b626c6000a82"
    assert core.bytes == 16_694_212 and core.mirror_dir == "linux" and core.build.subset == ("kernel", "mm")
    assert full.sha256 == "e654848ed49eda149fc56bff0805a1fa942d3b80620af80fb76b854ae32120ef"
    assert full.bytes == 1_177_071_176 and full.build.subset == ()
    assert full.mirror_dir != "linux"  # the shared mirror's linux/ holds the subset
    assert pg.url is None and pg.sha256.startswith("9828efc93439") and pg.bytes == 3_063_864
    for e in entries.values():
        assert e.license and e.source and e.description


@pytest.mark.parametrize("name", ["linux-core", "paulgraham", "shakespeare"])
def test_get_from_the_shared_mirror(isolated_corpora, name):
    if not (SHARED_MIRROR / "linux" / "input.txt").exists():
        pytest.skip("no shared corpus mirror")
    r = run("corpus", "get", name, "--mirror", SHARED_MIRROR)  # the packaged registry entry
    assert r.exit_code == 0, r.output
    assert "sha256 verified" in r.stderr
    assert (isolated_corpora / name / "input.txt").stat().st_size == corpus.lookup(name).bytes
    r = run("corpus", "get", name, "--mirror", SHARED_MIRROR)
    assert r.exit_code == 0 and "already present" in r.stderr


def test_no_url_entries_say_where_to_get_them(isolated_corpora, tmp_path):
    assert_clean_error(run("corpus", "get", "paulgraham"), "no single-file download URL.*must come from a mirror.*--mirror")
    assert_clean_error(
        run("corpus", "get", "linux", "--mirror", tmp_path),
        "linux has no single-file download URL and mirror .* has no linux-full/input.txt.*--from PATH",
    )
    assert_clean_error(run("corpus", "get", "paulgraham", "--from", tmp_path), "not built from a source tree.*linux")
    assert_clean_error(run("corpus", "get", "linux", "--subset", "kernel"), "go with --from")


def test_get_from_tree_and_tarball_verifies(isolated_corpora, tree, tmp_path):
    register(
        isolated_corpora, "core", expected_bytes(tree, ("kernel", "mm")), subset=("kernel", "mm"), extra="mirror_name: linux\n"
    )
    dest = isolated_corpora / "core" / "input.txt"
    for source in (tree, make_tarball(tree, tmp_path / "linux.tar.xz")):
        dest.unlink(missing_ok=True)
        r = run("corpus", "get", "core", "--from", source)
        assert r.exit_code == 0, r.output
        assert "files" in r.stderr and "sha256 verified" in r.stderr
        assert dest.read_bytes() == expected_bytes(tree, ("kernel", "mm"))
    assert sorted(p.name for p in dest.parent.iterdir()) == ["input.txt"]
    # mirror_name: the mirror keeps it under linux/.
    mirror = tmp_path / "mirror"
    (mirror / "linux").mkdir(parents=True)
    shutil.copy(dest, mirror / "linux" / "input.txt")
    dest.unlink()
    r = run("corpus", "get", "core", "--mirror", mirror)
    assert r.exit_code == 0, r.output


def test_wrong_checksum_or_bad_tarball_leaves_nothing(isolated_corpora, tree, tmp_path):
    register(isolated_corpora, "core", b"something else", subset=("kernel", "mm"))
    r = run("corpus", "get", "core", "--from", make_tarball(tree, tmp_path / "linux.tar.gz"))
    assert_clean_error(r, "checksum mismatch for core built from .*not kept")
    assert list((isolated_corpora / "core").iterdir()) == []
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"this is not a tar archive at all" * 100))
    assert_clean_error(run("corpus", "get", "core", "--from", bad), "not a readable tarball")
    assert list((isolated_corpora / "core").iterdir()) == []
    assert_clean_error(run("corpus", "get", "core", "--from", tmp_path / "nope.tar.xz"), "does not exist")
    assert_clean_error(run("corpus", "get", "core", "--from", tree, "--subset", "nosuch", "-o", tmp_path / "o.txt"), "no regular")
    assert not (tmp_path / "o.txt").exists()


def test_no_published_checksum_reports_the_sha256_it_built(isolated_corpora, tree, tmp_path):
    register(isolated_corpora, "full", None)
    r = run("corpus", "get", "full", "--from", make_tarball(tree, tmp_path / "linux.tar"))
    assert r.exit_code == 0, r.output
    sha = hashlib.sha256(expected_bytes(tree)).hexdigest()
    assert sha in r.stderr and "could not be verified" in r.stderr and "DIFFERS" in r.stderr
    assert (isolated_corpora / "full" / "input.txt").read_bytes() == expected_bytes(tree)
    # A custom subset is not the registered corpus: it needs --out, and says which entry it would be.
    register(isolated_corpora, "core", None, subset=("kernel", "mm"))
    assert_clean_error(
        run("corpus", "get", "full", "--from", tree, "--subset", "mm,kernel"),
        "differs from the registered full corpus.*--out FILE.*corpus get (linux-)?core",
    )
    out = tmp_path / "custom" / "mm.txt"
    r = run("corpus", "get", "full", "--from", tree, "--subset", "mm", "--out", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == (tree / "mm/x.h").read_bytes() and "custom --subset" in r.stderr
