"""The vocabulary as the exported generators need it: what each id prints, how a prime becomes ids.

A record of plain JSON that generate.py and the web page read without charlm:

- char: `symbols`, the character of each id; a prime is encoded character by character.
- bytes: `bytes`, the byte of each id; text is UTF-8 and a prime is encoded byte by byte.
- spm: `pieces`, each piece's UTF-8 bytes (hex), so decoding needs no SentencePiece; `model`, the
  serialized SentencePiece model (base64), which encoding a prime needs (generate.py imports the
  sentencepiece package only then); the page has no SentencePiece encoder, so it generates from
  the start symbol and refuses a prime (page/app.js says so).

`start` is the ids a stream starts from without a prime (charlm starts as if after a line break).
"""

from __future__ import annotations

import base64
from typing import Any

from charlm.decoding.streams import prime_ids


def tokenizer_record(vocab: Any) -> dict[str, Any]:
    """The JSON record of a charlm vocabulary (Vocab or SpmVocab) for the torch-free generators."""
    base = {"size": len(vocab), "start": [int(i) for i in prime_ids(vocab, "")]}
    if vocab.kind == "char":
        return {"kind": "char", "symbols": [vocab.symbol(i) for i in range(len(vocab))], **base}
    if vocab.kind == "bytes":
        return {"kind": "bytes", "bytes": [int(c) for c in vocab.codes], **base}
    by_id = {i: b for b, i in vocab.byte_ids.items()}  # a byte piece prints its byte, whatever its name says
    pieces = [bytes([by_id[i]]) if i in by_id else vocab.decode([i]).encode("utf-8") for i in range(len(vocab))]
    return {
        "kind": "spm",
        "tokenizer": vocab.tokenizer,
        "sha256": vocab.sha256,
        "pieces": [p.hex() for p in pieces],
        "space_ids": [vocab.byte_ids[b] for b in "\u2581".encode()],
        **base,
        "model": base64.b64encode(vocab.model_bytes).decode("ascii"),
    }
