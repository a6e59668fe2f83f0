"""Text (file, directory or named corpus) -> prepared dir: meta.json + train/val/test.bin.

Streams in chunks, two passes: the first checks the encoding and collects the vocabulary, the
second encodes and writes. The corpus never sits in memory as one Python string. A SentencePiece
tokenizer adds a pass between them: the training split streamed to a temporary file of lines,
which the SentencePiece trainer reads.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from charlm import CharlmError, allocator, atomicdir, corpus, spm
from charlm.spm import SpmVocab, TokenizerSpec
from charlm.vocab import MAX_CODEPOINT, Vocab

CHUNK = 1 << 23  # 8 MiB of bytes per read
SPLITS = ("train", "val", "test")
DATA_FORMAT = "charlm-data"
DATA_VERSION = 1
TOKENIZER_FILE = "tokenizer.model"  # the serialized SentencePiece model, in the prepared dir
PREPARED_FILES = ("meta.json", *(f"{s}.bin" for s in SPLITS), TOKENIZER_FILE)  # all a prepared dir holds

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


def _reads(files: list[Path], hasher=None) -> Iterator[tuple[Path, bytes, bool, int, int]]:
    """Yield (path, raw chunk, last of its file?, its offset in the file, bytes consumed so far).

    `hasher` (e.g. hashlib.sha256()), if given, is fed every raw chunk: the checksum needs no
    pass of its own.
    """
    done = 0
    for path in files:
        offset = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                final = len(chunk) < CHUNK
                if hasher is not None:
                    hasher.update(chunk)
                done += len(chunk)
                yield path, chunk, final, offset, done
                offset += len(chunk)
                if final:
                    break


def _chunks(files: list[Path], encoding: str, hasher=None) -> Iterator[tuple[bytes, str | None, int]]:
    """Yield (raw chunk, its text, bytes consumed so far), checking the encoding on the way.

    The text is None when the raw bytes are the units themselves: --encoding bytes, or a chunk of
    plain ASCII.
    """
    decoder = None
    for path, chunk, final, offset, done in _reads(files, hasher):
        if offset == 0:
            decoder = codecs.getincrementaldecoder("utf-8")()  # each file decodes on its own
        text = None if encoding == "bytes" else _decode(chunk, decoder, final, path, offset)
        yield chunk, text, done


def _units(files: list[Path], encoding: str) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (units, bytes consumed so far): code points for 'utf-8', byte values for 'bytes'."""
    for chunk, text, done in _chunks(files, encoding):
        if text is None:
            yield np.frombuffer(chunk, dtype=np.uint8), done
        else:
            yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), done


def _decode(chunk: bytes, decoder, final: bool, path: Path, offset: int) -> str | None:
    """The chunk's text, or None if it is plain ASCII (its bytes are its code points)."""
    nul = chunk.find(b"\x00")
    if nul >= 0:
        raise CharlmError(
            f"{path} looks like a binary file (NUL byte at offset {offset + nul}); charlm trains on text "
            "(use --encoding bytes to model raw bytes anyway)"
        )
    # ASCII fast path: no decoding needed when no multi-byte sequence is pending.
    if chunk.isascii() and not decoder.getstate()[0]:
        return None
    try:
        return decoder.decode(chunk, final=final)
    except UnicodeDecodeError as e:
        raise CharlmError(
            f"{path} is not valid UTF-8 (byte offset {offset + e.start}); convert it "
            "(e.g. iconv -f latin1 -t utf-8) or use --encoding bytes for a byte-level vocabulary"
        ) from None


_ASCII_BYTES = bytes(range(0x80))
_NON_ASCII_BYTES = bytes(range(0x80, 0x100))  # in UTF-8 text, never symbols by themselves
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # the 2nd-4th bytes of a UTF-8 character


class _Scan:
    """Pass 1's tally: units counted and symbols seen, without turning the text into arrays.

    Copying each chunk's text into UTF-32 code points and counting them all took most of this
    pass. Instead, bytes.translate (fast, in C) drops the byte values already seen: what is left
    is short, new ASCII symbols and the bytes of the non-ASCII characters, which a second UTF-8
    decoder reads (ASCII bytes never occur inside a multi-byte sequence, so dropping them leaves
    those sequences whole, and one split across chunks is joined by the incremental decoder).
    """

    def __init__(self, encoding: str):
        self.seen = np.zeros(MAX_CODEPOINT if encoding == "utf-8" else 256, dtype=bool)
        self.utf8 = encoding == "utf-8"
        self.ascii_seen = b""  # ASCII (or, for bytes, any) byte values seen so far
        self.wide = codecs.getincrementaldecoder("utf-8")()  # for the non-ASCII bytes only
        self.units = 0

    def add(self, chunk: bytes, text: str | None) -> None:
        self.units += len(chunk) if text is None else len(text)
        new = chunk.translate(None, self.ascii_seen)  # unseen byte values, and (UTF-8) the non-ASCII bytes
        if not new:
            return
        if self.utf8:
            narrow = set(new.translate(None, _NON_ASCII_BYTES))  # the new ASCII byte values
            wide = self.wide.decode(new.translate(None, _ASCII_BYTES))
            if wide:
                self.seen[np.unique(np.frombuffer(wide.encode("utf-32-le"), dtype=np.uint32))] = True
        else:
            narrow = set(new)
        if narrow:
            self.seen[sorted(narrow)] = True
            self.ascii_seen += bytes(sorted(narrow))

    def codes(self) -> np.ndarray:
        return np.flatnonzero(self.seen)


def _char_ids(files: list[Path], encoding: str, vocab: Vocab, sha256: str) -> Iterator[tuple[np.ndarray, int]]:
    """Pass 2 for a character vocabulary: (ids, one per unit, bytes consumed so far).

    Pass 1 has checked the encoding, so the bytes are turned into ids without Python's decoder
    and a UTF-32 copy (together about as costly as the rest of prepare): bytes.translate drops
    the UTF-8 continuation bytes and maps every remaining byte to its id in one C loop (ASCII
    symbols, and any byte of a byte vocabulary, have ids below 256); the few multi-byte
    characters get theirs by array arithmetic at their lead bytes. The input is hashed again and
    must match pass 1's sha256: a file changed in between is an error, not a wrong encoding.
    """
    lut = vocab.lookup_table()
    if lut is None:  # code points too large for a dense table: the general path
        for units, done in _units(files, encoding):
            yield vocab.encode_units(units, dtype=vocab.id_dtype), done
        return
    top = 0x80 if encoding == "utf-8" else 0x100  # byte values that are symbols by themselves
    table = np.zeros(256, dtype=np.uint8)
    table[: min(top, len(lut))] = np.maximum(lut[:top], 0)
    table = table.tobytes()
    sha, carry = hashlib.sha256(), b""
    for _, chunk, final, _, done in _reads(files, sha):
        data = carry + chunk if carry else chunk
        carry = b""
        if encoding == "utf-8" and not final:
            data, carry = _complete_utf8(data)
        if encoding == "bytes" or data.isascii():
            ids = np.frombuffer(data.translate(table), dtype=np.uint8)
        else:
            ids = _utf8_ids(data, table, lut)
        yield ids.astype(vocab.id_dtype, copy=False), done
    if sha.hexdigest() != sha256:
        raise CharlmError(f"the input changed while it was being prepared ({files[0] if len(files) == 1 else 'one of the files'}): run the command again")


def _complete_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Split off an incomplete multi-byte sequence at the end (it continues in the next chunk)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data, b""
        if byte >= 0xC0:  # the last sequence's lead byte: complete if all its bytes are here
            need = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2
            return (data, b"") if need == back else (data[:-back], data[-back:])
    return data, b""


def _utf8_ids(data: bytes, table: bytes, lut: np.ndarray) -> np.ndarray:
    """Ids of valid UTF-8 text made of whole characters: one per character."""
    ids = np.frombuffer(data.translate(table, _CONTINUATION_BYTES), dtype=np.uint8).astype(lut.dtype)
    b = np.frombuffer(data, dtype=np.uint8)
    lead = np.flatnonzero(b >= 0xC0)  # where each multi-byte character starts
    first = b[lead].astype(np.uint32)
    length = 2 + (first >= 0xE0) + (first >= 0xF0)
    code = first & np.where(length == 4, 0x07, np.where(length == 3, 0x0F, 0x1F)).astype(np.uint32)
    for k in (1, 2, 3):
        more = length > k
        code[more] = (code[more] << 6) | (b[lead[more] + k] & 0x3F)
    # A character's position among characters: its byte offset less the continuation bytes before it.
    skipped = np.concatenate([[0], np.cumsum(length - 1)[:-1]])
    ids[lead - skipped] = lut[np.minimum(code, len(lut) - 1)]
    return ids


def units_to_text(units: np.ndarray) -> str:
    """Code points (uint32, or uint8 from the ASCII fast path) back to a string."""
    if units.dtype == np.uint8:
        return units.tobytes().decode("latin-1")
    return units.astype("<u4", copy=False).tobytes().decode("utf-32-le")


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
        raise CharlmError(f"--split needs three non-negative fractions summing to 1, train > 0 (got {fractions})")
    return tuple(float(f) for f in fractions)


def prepare(
    files: list[Path],
    out_dir: Path,
    encoding: str = "utf-8",
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    progress: Progress | None = None,
    tokenizer: TokenizerSpec | None = None,
) -> dict:
    """Write out_dir/{train,val,test}.bin and meta.json (plus tokenizer.model for SentencePiece); return the meta record.

    Atomic: the dir is built beside out_dir and swapped in when complete, so a failure leaves an
    existing prepared dir as it was. An existing out_dir holding other files is refused.
    """
    if encoding not in ("utf-8", "bytes"):
        raise CharlmError(f"--encoding must be utf-8 or bytes (got {encoding!r})")
    spec = (tokenizer or TokenizerSpec()).checked()
    if spec.is_spm and encoding != "utf-8":
        raise CharlmError(f"--tokenizer {spec.kind} reads UTF-8 text: drop --encoding bytes (byte fallback already covers any character)")
    fractions = check_fractions(fractions)
    total = _total_bytes(files)
    if total == 0:
        raise CharlmError(f"{files[0] if len(files) == 1 else 'the input'} is empty: there is nothing to train on")
    start = time.perf_counter()
    with allocator.streaming(), atomicdir.building(Path(out_dir), PREPARED_FILES) as work:
        return _prepare_into(work, files, encoding, fractions, progress, spec, total, start)


def _prepare_into(out_dir: Path, files, encoding, fractions, progress, spec: TokenizerSpec, total: int, start: float) -> dict:
    """prepare's passes, writing into a fresh work dir."""
    # Pass 1: validate, hash, count, collect the vocabulary.
    sha = hashlib.sha256()
    scan = _Scan(encoding)
    for chunk, text, done in _chunks(files, encoding, hasher=sha):
        scan.add(chunk, text)
        if progress:
            progress("scan", done, total)
    n_units = scan.units

    bounds = (0, *split_bounds(n_units, fractions), n_units)
    if spec.is_spm:
        vocab = _train_tokenizer(files, out_dir, bounds[1], spec, len(scan.codes()), progress, total)
        tokenizer_meta = {**spec.to_meta(), "vocab_size": len(vocab), "sha256": vocab.sha256, "file": TOKENIZER_FILE}
        encoders = {s: _SpmEncoder(vocab) for s in SPLITS}
        pieces = _units(files, encoding)
    else:
        vocab = Vocab("char" if encoding == "utf-8" else "bytes", scan.codes())
        tokenizer_meta = {"kind": vocab.kind}
        encoders = {s: _CharEncoder() for s in SPLITS}
        pieces = _char_ids(files, encoding, vocab, sha.hexdigest())

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
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, out_dir / "meta.json")
    return meta


class _CharEncoder:
    """The pieces are ids already (_char_ids), one per unit: nothing to do or carry between chunks."""

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
            for units, done in _units(files, "utf-8"):
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
        kind = json.loads((prepared / "meta.json").read_text()).get("tokenizer", {}).get("kind", "char")
    except (OSError, ValueError, AttributeError):
        return  # PreparedData reports a broken meta.json properly
    if (kind if kind != "bytes" else "char") != tokenizer.kind:
        raise CharlmError(
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
    stem = files[0].parent.name if files[0].name == "input.txt" else files[0].stem
    cache = corpus.corpora_dir() / ".cache" / f"{stem}-{h.hexdigest()[:12]}-{options_key(encoding, fractions, spec)}"
    if not (cache / "meta.json").exists():
        prepare(files, cache, encoding=encoding, fractions=fractions, progress=progress, tokenizer=spec)
    return cache
