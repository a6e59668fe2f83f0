"""prepare's passes over the raw text, in chunks: read (and hash), check the encoding, tally the
vocabulary (pass 1), and turn bytes into character ids without a Python string per chunk (pass 2)."""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from charlm.errors import DataError
from charlm.terminal import shown
from charlm.tokenizers.vocab import MAX_CODEPOINT, Vocab

CHUNK = 1 << 23  # 8 MiB of bytes per read


BOM = codecs.BOM_UTF8  # a leading BOM marks a file as UTF-8; it is not text (the rule everywhere a text is read)


def _reads(files: list[Path], hasher=None, text: bool = False) -> Iterator[tuple[Path, bytes, bool, int, int]]:
    """Yield (path, raw chunk, last of its file?, its offset in the file, bytes consumed so far).

    `hasher` (e.g. hashlib.sha256()), if given, is fed every raw chunk: the checksum needs no
    pass of its own. `text`: each file's leading UTF-8 BOM is left out of the chunks (not of the hash).
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
                skip = len(BOM) if text and offset == 0 and chunk.startswith(BOM) else 0
                yield path, chunk[skip:], final, offset + skip, done
                offset += len(chunk)
                if final:
                    break


def read_chunks(files: list[Path], encoding: str, hasher=None) -> Iterator[tuple[bytes, str | None, int]]:
    """Yield (raw chunk, its text, bytes consumed so far), checking the encoding on the way.

    The text is None when the raw bytes are the units themselves: --encoding bytes, or a chunk of
    plain ASCII.
    """
    decoder, current = None, None
    for path, chunk, final, offset, done in _reads(files, hasher, text=encoding != "bytes"):
        if path is not current:
            decoder, current = codecs.getincrementaldecoder("utf-8")(), path  # each file decodes on its own
        text = None if encoding == "bytes" else _decode(chunk, decoder, final, path, offset)
        yield chunk, text, done


def read_units(files: list[Path], encoding: str) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (units, bytes consumed so far): code points for 'utf-8', byte values for 'bytes'."""
    for chunk, text, done in read_chunks(files, encoding):
        if text is None:
            yield np.frombuffer(chunk, dtype=np.uint8), done
        else:
            yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), done


def _decode(chunk: bytes, decoder, final: bool, path: Path, offset: int) -> str | None:
    """The chunk's text, or None if it is plain ASCII (its bytes are its code points)."""
    nul = chunk.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{shown(path)} looks like a binary file (NUL byte at offset {offset + nul}); charlm trains on text "
            "(use --encoding bytes to model raw bytes anyway)"
        )
    # ASCII fast path: no decoding needed when no multi-byte sequence is pending.
    if chunk.isascii() and not decoder.getstate()[0]:
        return None
    try:
        return decoder.decode(chunk, final=final)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{shown(path)} is not valid UTF-8 (byte offset {offset + e.start}); convert it "
            "(e.g. iconv -f latin1 -t utf-8) or use --encoding bytes for a byte-level vocabulary"
        ) from None


_ASCII_BYTES = bytes(range(0x80))
_NON_ASCII_BYTES = bytes(range(0x80, 0x100))  # in UTF-8 text, never symbols by themselves
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # the 2nd-4th bytes of a UTF-8 character


class Scan:
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
        """The symbols seen so far: sorted code points (or byte values)."""
        return np.flatnonzero(self.seen)


def char_ids(files: list[Path], encoding: str, vocab: Vocab, sha256: str) -> Iterator[tuple[np.ndarray, int]]:
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
        for units, done in read_units(files, encoding):
            yield vocab.encode_units(units, dtype=vocab.id_dtype), done
        return
    top = 0x80 if encoding == "utf-8" else 0x100  # byte values that are symbols by themselves
    table = np.zeros(256, dtype=np.uint8)
    table[: min(top, len(lut))] = np.maximum(lut[:top], 0)
    table = table.tobytes()
    sha, carry = hashlib.sha256(), b""
    for _, chunk, final, _, done in _reads(files, sha, text=encoding != "bytes"):
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
        raise DataError(
            f"the input changed while it was being prepared ({shown(files[0]) if len(files) == 1 else 'one of the files'}): run the command again"
        )


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
