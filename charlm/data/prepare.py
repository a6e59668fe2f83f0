"""Text (file, directory or named corpus) -> prepared dir: meta.json + train/val/test.bin.

Streams in chunks, two passes: the first checks the encoding and collects the vocabulary, the
second encodes and writes. The corpus never sits in memory as one Python string. A SentencePiece
tokenizer adds a pass between them: the training split streamed to a temporary file of lines,
which the SentencePiece trainer reads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from charlm import allocator
from charlm.data import atomicdir, corpus
from charlm.data.encode import Scan, char_ids, read_chunks, read_units, units_to_text
from charlm.data.format import (
    DATA_FORMAT,
    DATA_VERSION,
    PREPARED_FILES,
    SPLITS,
    TOKENIZER_FILE,
)
from charlm.errors import DataError
from charlm.terminal import shown
from charlm.tokenizers import spm
from charlm.tokenizers.spm import SpmVocab, TokenizerSpec
from charlm.tokenizers.vocab import Vocab

Progress = Callable[[str, int, int], None]  # (phase, bytes done, bytes total)


def resolve_inputs(source: str | Path, glob: str | None = None, mirror: str | None = None) -> list[Path]:
    """A file, a directory (files matching glob, sorted by path) or a registered corpus name."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob(glob or "**/*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"directory {shown(path)} has no files matching {glob or '**/*'} (use --glob)")
        return files
    if str(source) in corpus.registry():
        return [corpus.get(str(source), mirror=mirror)]
    if path.is_symlink():
        raise DataError(f"{shown(source)} is a symbolic link to {shown(os.readlink(path))}, which does not exist")
    raise DataError(f"{shown(source)} is neither a file, a directory nor a registered corpus (see: charlm corpus list)")


def _total_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def split_bounds(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Unit offsets where val and test start: a deterministic contiguous split."""
    train_end = int(n * fractions[0])
    val_end = int(n * (fractions[0] + fractions[1]))
    return train_end, val_end


def check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    ok = len(fractions) == 3 and all(math.isfinite(f) and f >= 0 for f in fractions)  # NaN fails every comparison
    if not ok or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise DataError(f"--split needs three non-negative fractions summing to 1, train > 0 (got {fractions})")
    return tuple(float(f) for f in fractions)


def prepare(
    files: list[Path],
    out_dir: Path,
    encoding: str = "utf-8",
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    progress: Progress | None = None,
    tokenizer: TokenizerSpec | None = None,
    base_vocab: Vocab | SpmVocab | None = None,
) -> dict:
    """Write out_dir/{train,val,test}.bin and meta.json (plus tokenizer.model for SentencePiece); return the meta record.

    base_vocab (a checkpoint's, for fine-tuning: --vocab-from): a character vocabulary keeps every id and
    gets the text's new characters appended (Vocab.extended); a SentencePiece one is used as it is (its
    byte pieces already spell any text), no tokenizer is trained.

    Atomic: the dir is built beside out_dir and swapped in when complete, so a failure leaves an
    existing prepared dir as it was. An existing out_dir holding other files is refused.
    """
    if encoding not in ("utf-8", "bytes"):
        raise DataError(f"--encoding must be utf-8 or bytes (got {encoding!r})")
    spec = (tokenizer or TokenizerSpec()).checked()
    spec = check_base(base_vocab, encoding, spec)
    if spec.is_spm and encoding != "utf-8":
        raise DataError(
            f"--tokenizer {spec.kind} reads UTF-8 text: drop --encoding bytes (byte fallback already covers any character)"
        )
    fractions = check_fractions(fractions)
    total = _total_bytes(files)
    if total == 0:
        raise DataError(f"{shown(files[0]) if len(files) == 1 else 'the input'} is empty: there is nothing to train on")
    start = time.perf_counter()
    with allocator.streaming(), atomicdir.building(Path(out_dir), PREPARED_FILES) as work:
        return _prepare_into(work, files, encoding, fractions, progress, spec, total, start, base_vocab)


def check_base(base, encoding: str, spec: TokenizerSpec) -> TokenizerSpec:
    """The tokenizer that goes with a base vocabulary (its own), or an error when the options contradict it."""
    if base is None:
        return spec
    if base.kind == "spm":
        if encoding != "utf-8":
            raise DataError("the base vocabulary is a SentencePiece tokenizer, which reads UTF-8 text: drop --encoding bytes")
        return TokenizerSpec(base.tokenizer).checked()
    if spec.is_spm:
        raise DataError(f"the base vocabulary is {base.describe()}: a --tokenizer {spec.kind} would replace it; drop --tokenizer")
    if base.kind != ("char" if encoding == "utf-8" else "bytes"):
        raise DataError(
            f"the base vocabulary is {base.describe()}, the text is read as {encoding}: "
            f"use --encoding {'bytes' if base.kind == 'bytes' else 'utf-8'}"
        )
    return spec


def _prepare_into(
    out_dir: Path, files, encoding, fractions, progress, spec: TokenizerSpec, total: int, start: float, base=None
) -> dict:
    """prepare's passes, writing into a fresh work dir."""
    # Pass 1: validate, hash, count, collect the vocabulary.
    sha = hashlib.sha256()
    scan = Scan(encoding)
    for chunk, text, done in read_chunks(files, encoding, hasher=sha):
        scan.add(chunk, text)
        if progress:
            progress("scan", done, total)
    n_units = scan.units

    bounds = (0, *split_bounds(n_units, fractions), n_units)
    if spec.is_spm:
        vocab = (
            base if base is not None else _train_tokenizer(files, out_dir, bounds[1], spec, len(scan.codes()), progress, total)
        )
        if base is not None:
            (out_dir / TOKENIZER_FILE).write_bytes(base.model_bytes)
        tokenizer_meta = {**spec.to_meta(), "vocab_size": len(vocab), "sha256": vocab.sha256, "file": TOKENIZER_FILE}
        encoders = {s: _SpmEncoder(vocab) for s in SPLITS}
        pieces = read_units(files, encoding)
    else:
        vocab = Vocab("char" if encoding == "utf-8" else "bytes", scan.codes()) if base is None else base.extended(scan.codes())
        tokenizer_meta = {"kind": vocab.kind}
        encoders = {s: _CharEncoder() for s in SPLITS}
        pieces = char_ids(files, encoding, vocab, sha.hexdigest())

    # Pass 2: encode and write each split.
    dtype = vocab.id_dtype
    counts = _encode_splits(pieces, bounds, encoders, out_dir, dtype, progress, total)

    meta = {
        "format": DATA_FORMAT,
        "version": DATA_VERSION,
        "tokenizer": tokenizer_meta,
        "vocab": vocab.to_meta(),
        "vocab_size": len(vocab),
        "dtype": np.dtype(dtype).name,
        "encoding": encoding,
        "split_fractions": list(fractions),
        # Characters per split are counted on the text itself: for a character vocabulary they equal
        # the tokens (for bytes, a 'char' is a byte); a SentencePiece piece may span several.
        "splits": {s: {"tokens": counts[s], "chars": bounds[i + 1] - bounds[i]} for i, s in enumerate(SPLITS)},
        "source": {
            "paths": [str(p.resolve()) for p in files],
            "sha256": sha.hexdigest(),
            "bytes": total,
            "chars": n_units,
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    tmp = out_dir / "meta.json.part"
    # A path that is not UTF-8 (surrogate escapes) is written as JSON escapes, read back as the same path.
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, out_dir / "meta.json")
    return meta


class _CharEncoder:
    """The pieces are ids already (char_ids), one per unit: nothing to do or carry between chunks."""

    @staticmethod
    def feed(ids: np.ndarray) -> np.ndarray:
        return ids

    def finish(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


class _SpmEncoder:
    """Units to text to SentencePiece ids; the open line is held back until it is complete."""

    def __init__(self, vocab: SpmVocab):
        self.inner = vocab.stream_encoder()

    def feed(self, units: np.ndarray) -> np.ndarray:
        return self.inner.feed(units_to_text(units))

    def finish(self) -> np.ndarray:
        return self.inner.finish()


def _encode_splits(pieces, bounds, encoders, out_dir: Path, dtype, progress, total) -> dict[str, int]:
    """Pass 2: (units, bytes done) pieces, each split's through its own encoder into SPLIT.bin; the tokens written per split."""
    outs = {s: open(out_dir / f"{s}.bin.part", "wb") for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)

    def write(split: str, ids: np.ndarray) -> None:
        outs[split].write(np.ascontiguousarray(ids, dtype=dtype).data)
        counts[split] += len(ids)

    pos = 0
    try:
        for units, done in pieces:
            for i, s in enumerate(SPLITS):
                lo, hi = max(bounds[i] - pos, 0), min(bounds[i + 1] - pos, len(units))
                if hi > lo:
                    write(s, encoders[s].feed(units[lo:hi]))
            pos += len(units)
            if progress:
                progress("encode", done, total)
        for s in SPLITS:
            write(s, encoders[s].finish())
    except BaseException:
        for s in SPLITS:
            outs[s].close()
            (out_dir / f"{s}.bin.part").unlink(missing_ok=True)  # nothing half-written left behind
        raise
    for f in outs.values():
        f.close()
    for s in SPLITS:
        os.replace(out_dir / f"{s}.bin.part", out_dir / f"{s}.bin")
    return counts


def _train_tokenizer(files, out_dir: Path, n_train: int, spec: TokenizerSpec, distinct: int, progress, total) -> SpmVocab:
    """Train SentencePiece on the training split only (streamed to a temporary file of lines); keep its model in out_dir."""
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tokenizer-train.", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:  # newline="": a "\r" stays a "\r"
            pos, column = 0, 0
            for units, done in read_units(files, "utf-8"):
                take = min(len(units), n_train - pos)
                if take > 0:
                    text, column = spm.fold_lines(units_to_text(units[:take]), column)
                    f.write(text)
                pos += len(units)
                if progress:
                    progress("tokenizer", done, total)
                if pos >= n_train:
                    break
        model = spm.train(Path(tmp), spec, distinct)
    finally:
        os.unlink(tmp)
    vocab = SpmVocab(model, spec.kind)
    part = out_dir / (TOKENIZER_FILE + ".part")
    part.write_bytes(model)
    os.replace(part, out_dir / TOKENIZER_FILE)
    return vocab


def options_key(encoding: str, fractions, tokenizer: TokenizerSpec | None = None) -> str:
    """A short hash of the prepare options, part of a cache dir's name (unchanged for the char tokenizer)."""
    options = [DATA_VERSION, encoding, list(fractions)]
    if tokenizer is not None and tokenizer.is_spm:
        options.append(tokenizer.to_meta())
    return hashlib.sha256(json.dumps(options).encode()).hexdigest()[:8]


def _check_tokenizer(prepared: Path, tokenizer: TokenizerSpec | None) -> None:
    """A prepared dir keeps its own tokenizer: asking for another one is a mistake worth a word."""
    if tokenizer is None:
        return
    try:
        kind = json.loads((prepared / "meta.json").read_text(encoding="utf-8")).get("tokenizer", {}).get("kind", "char")
    except (OSError, ValueError, AttributeError):
        return  # PreparedData reports a broken meta.json properly
    if (kind if kind != "bytes" else "char") != tokenizer.kind:
        raise DataError(
            f"{prepared} is already prepared with the {kind} tokenizer; --tokenizer applies to text inputs "
            f"(give the text, or prepare it again: charlm prepare TEXT -o DIR --tokenizer {tokenizer.kind})"
        )


def cached_prepare(
    source: str | Path,
    encoding: str = "utf-8",
    fractions=(0.9, 0.05, 0.05),
    mirror: str | None = None,
    progress: Progress | None = None,
    glob: str | None = None,
    tokenizer: TokenizerSpec | None = None,
    files: list[Path] | None = None,
    base_vocab: Vocab | SpmVocab | None = None,
) -> Path:
    """Train-on-the-fly: a prepared dir as given, or one prepared once into corpora/.cache/ and reused.

    `files`: the source's files when the caller has resolved them already (saves fetching twice).
    """
    path = Path(source)
    if path.is_dir() and (path / "meta.json").exists():
        _check_tokenizer(path, tokenizer)
        return path
    spec = (tokenizer or TokenizerSpec()).checked()
    files = files or resolve_inputs(source, glob=glob, mirror=mirror)
    fractions = check_fractions(tuple(fractions))
    h = hashlib.sha256()
    for f in files:
        h.update(corpus.sha256_file(f).encode())
    key = options_key(encoding, fractions, check_base(base_vocab, encoding, spec))
    if base_vocab is not None:  # prepared against a checkpoint's vocabulary: another cache entry
        key += "-v" + hashlib.sha256(json.dumps(base_vocab.to_meta(), sort_keys=True).encode()).hexdigest()[:8]
    cache = corpus.corpora_dir() / ".cache" / f"{_cache_stem(files[0])}-{h.hexdigest()[:12]}-{key}"
    if not (cache / "meta.json").exists():
        try:
            prepare(
                files, cache, encoding=encoding, fractions=fractions, progress=progress, tokenizer=spec, base_vocab=base_vocab
            )
        except OSError as e:  # the cache cannot be written (read-only, no permission, a file in the way, full)
            if e.errno not in CACHE_ERRORS or not shown(e.filename or "").startswith(shown(cache.parent.parent)):
                raise
            raise _cache_not_writable(cache, e, source) from None
    return cache


CACHE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT)


def _cache_stem(first: Path) -> str:
    """The readable part of a cache dir's name: the text's name, UTF-8 and short (the hashes follow it)."""
    stem = first.parent.name if first.name == "input.txt" else first.stem
    return shown(stem)[:80]


def _cache_not_writable(cache: Path, e: OSError, source) -> DataError:
    return DataError(
        f"cannot write the prepare cache {shown(cache.parent)} ({e.strerror or e}); give a writable "
        f"--corpora-dir, or prepare the text yourself (charlm prepare {shown(source)} -o DIR) and train on DIR"
    )
