"""Text (file, directory or named corpus) -> prepared dir: meta.json + train/val/test.bin.

Streams in chunks, two passes: the first checks the encoding and collects the vocabulary, the
second encodes and writes. The corpus never sits in memory as one Python string.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from charlm import CharlmError, corpus
from charlm.vocab import MAX_CODEPOINT, Vocab

CHUNK = 1 << 23  # 8 MiB of bytes per read
SPLITS = ("train", "val", "test")
DATA_FORMAT = "charlm-data"
DATA_VERSION = 1

Progress = Callable[[str, int, int], None]  # (phase, bytes done, bytes total)


def resolve_inputs(source: str | Path, glob: str | None = None, mirror: str | None = None) -> list[Path]:
    """A file, a directory (files matching glob, sorted by path) or a registered corpus name."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob(glob or "**/*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CharlmError(f"directory {path} has no files matching {glob or '**/*'} (use --glob)")
        return files
    if str(source) in corpus.registry():
        return [corpus.get(str(source), mirror=mirror)]
    raise CharlmError(f"{source} is neither a file, a directory nor a registered corpus (see: charlm corpus list)")


def _units(files: list[Path], encoding: str) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (units, bytes consumed so far): code points for 'utf-8', byte values for 'bytes'."""
    done = 0
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                final = len(chunk) < CHUNK
                if encoding == "bytes":
                    units = np.frombuffer(chunk, dtype=np.uint8)
                else:
                    units = _decode(chunk, decoder, final, path, offset)
                offset += len(chunk)
                done += len(chunk)
                yield units, done
                if final:
                    break


def _decode(chunk: bytes, decoder, final: bool, path: Path, offset: int) -> np.ndarray:
    nul = chunk.find(b"\x00")
    if nul >= 0:
        raise CharlmError(
            f"{path} looks like a binary file (NUL byte at offset {offset + nul}); charlm trains on text "
            "(use --encoding bytes to model raw bytes anyway)"
        )
    # ASCII fast path: no decoding needed when no multi-byte sequence is pending.
    if chunk.isascii() and not decoder.getstate()[0]:
        return np.frombuffer(chunk, dtype=np.uint8)
    try:
        text = decoder.decode(chunk, final=final)
    except UnicodeDecodeError as e:
        raise CharlmError(
            f"{path} is not valid UTF-8 (byte offset {offset + e.start}); convert it "
            "(e.g. iconv -f latin1 -t utf-8) or use --encoding bytes for a byte-level vocabulary"
        ) from None
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _total_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def split_bounds(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Unit offsets where val and test start: a deterministic contiguous split."""
    train_end = int(n * fractions[0])
    val_end = int(n * (fractions[0] + fractions[1]))
    return train_end, val_end


def check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise CharlmError(f"--split needs three non-negative fractions summing to 1, train > 0 (got {fractions})")
    return tuple(float(f) for f in fractions)


def prepare(
    files: list[Path],
    out_dir: Path,
    encoding: str = "utf-8",
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    progress: Progress | None = None,
) -> dict:
    """Write out_dir/{train,val,test}.bin and meta.json; return the meta record."""
    if encoding not in ("utf-8", "bytes"):
        raise CharlmError(f"--encoding must be utf-8 or bytes (got {encoding!r})")
    fractions = check_fractions(fractions)
    total = _total_bytes(files)
    if total == 0:
        raise CharlmError(f"{files[0] if len(files) == 1 else 'the input'} is empty: there is nothing to train on")
    start = time.perf_counter()

    # Pass 1: validate, hash, count, collect the vocabulary.
    sha = hashlib.sha256()
    seen = np.zeros(MAX_CODEPOINT if encoding == "utf-8" else 256, dtype=bool)
    n_units = 0
    for units, done in _units(files, encoding):
        if len(units):
            seen[: int(units.max()) + 1] |= np.bincount(units) > 0
        n_units += len(units)
        if progress:
            progress("scan", done, total)
    for path in files:  # hashing separately keeps pass 1 simple; it is cheap next to decoding
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
    vocab = Vocab("char" if encoding == "utf-8" else "bytes", np.flatnonzero(seen))

    # Pass 2: encode and write each split.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # meta.json last: its presence means complete
    bounds = (0, *split_bounds(n_units, fractions), n_units)
    dtype = vocab.id_dtype
    outs = {s: open(out_dir / f"{s}.bin.part", "wb") for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    pos = 0
    try:
        for units, done in _units(files, encoding):
            ids = vocab.encode_units(units).astype(dtype)
            for i, s in enumerate(SPLITS):
                lo, hi = max(bounds[i] - pos, 0), min(bounds[i + 1] - pos, len(ids))
                if hi > lo:
                    outs[s].write(ids[lo:hi].tobytes())
                    counts[s] += hi - lo
            pos += len(ids)
            if progress:
                progress("encode", done, total)
    finally:
        for f in outs.values():
            f.close()
    for s in SPLITS:
        os.replace(out_dir / f"{s}.bin.part", out_dir / f"{s}.bin")

    meta = {
        "format": DATA_FORMAT,
        "version": DATA_VERSION,
        "tokenizer": {"kind": vocab.kind},
        "vocab": vocab.to_meta(),
        "vocab_size": len(vocab),
        "dtype": np.dtype(dtype).name,
        "encoding": encoding,
        "split_fractions": list(fractions),
        # For a character vocabulary every token is one character; for bytes, a 'char' is a byte.
        "splits": {s: {"tokens": counts[s], "chars": counts[s]} for s in SPLITS},
        "source": {
            "paths": [str(p.resolve()) for p in files],
            "sha256": sha.hexdigest(),
            "bytes": total,
            "chars": n_units,
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    tmp = out_dir / "meta.json.part"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, out_dir / "meta.json")
    return meta


def options_key(encoding: str, fractions) -> str:
    return hashlib.sha256(json.dumps([DATA_VERSION, encoding, list(fractions)]).encode()).hexdigest()[:8]


def cached_prepare(
    source: str | Path,
    encoding: str = "utf-8",
    fractions=(0.9, 0.05, 0.05),
    mirror: str | None = None,
    progress: Progress | None = None,
    glob: str | None = None,
) -> Path:
    """Train-on-the-fly: a prepared dir as given, or one prepared once into corpora/.cache/ and reused."""
    path = Path(source)
    if path.is_dir() and (path / "meta.json").exists():
        return path
    files = resolve_inputs(source, glob=glob, mirror=mirror)
    fractions = check_fractions(tuple(fractions))
    h = hashlib.sha256()
    for f in files:
        h.update(corpus.sha256_file(f).encode())
    stem = files[0].parent.name if files[0].name == "input.txt" else files[0].stem
    cache = corpus.corpora_dir() / ".cache" / f"{stem}-{h.hexdigest()[:12]}-{options_key(encoding, fractions)}"
    if not (cache / "meta.json").exists():
        prepare(files, cache, encoding=encoding, fractions=fractions, progress=progress)
    return cache
