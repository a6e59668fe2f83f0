"""SentencePiece vocabularies (spm-char, bpe, unigram) that give back every text byte for byte.

The `sentencepiece` package is imported lazily, here only: the plain character vocabulary, the
default, never needs it. A model is trained so that encoding loses nothing: identity
normalization, no whitespace folding, no dummy prefix, the newline a piece of its own (the trainer
reads one sentence per line and would otherwise never see it), and byte fallback, so a character
outside the pieces becomes its UTF-8 bytes instead of an unknown symbol.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from charlm.errors import DataError
from charlm.tokenizers.ids import id_dtype_for

KINDS = ("char", "spm-char", "bpe", "unigram")  # the --tokenizer choices; all but char are SentencePiece
MODEL_TYPES = {"spm-char": "char", "bpe": "bpe", "unigram": "unigram"}
BYTE_PIECES = 256  # <0x00> .. <0xFF>, in every SentencePiece vocabulary here (byte fallback)
DEFAULT_PIECES = 1024  # bpe/unigram pieces besides the byte pieces, when --vocab-size is not given
# The trainer holds its input in memory (and unigram a suffix array over it): from a large training
# split it samples this many lines, each at most MAX_LINE characters.
MAX_SENTENCES = 1_000_000
MAX_LINE = 1000  # characters per training line: the trainer skips lines over 4192 bytes, a character takes up to 4
SPACE = "\u2581"  # "▁": SentencePiece's visible space inside pieces


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise DataError("SentencePiece tokenizers need the sentencepiece package: pip install 'sentencepiece>=0.2'") from None
    return sentencepiece


@dataclass(frozen=True)
class TokenizerSpec:
    """What --tokenizer, --vocab-size and --character-coverage ask for."""

    kind: str = "char"  # char (one id per character, no SentencePiece), spm-char, bpe or unigram
    vocab_size: int | None = None  # pieces besides the 256 byte pieces; bpe/unigram default 1024, spm-char: no cap
    character_coverage: float = 0.9995  # share of the training characters that get pieces; the rarest fall back to bytes

    def checked(self) -> "TokenizerSpec":
        """The same spec, or a CharlmError saying which value to fix."""
        if self.kind not in KINDS:
            raise DataError(f"--tokenizer must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise DataError(f"--vocab-size must be positive (got {self.vocab_size})")
        if not 0 < self.character_coverage <= 1:
            raise DataError(f"--character-coverage must be in (0, 1] (got {self.character_coverage})")
        if self.kind == "char" and (self.vocab_size is not None or self.character_coverage != 0.9995):
            raise DataError(
                "--vocab-size and --character-coverage apply to SentencePiece tokenizers (--tokenizer spm-char, bpe or unigram)"
            )
        return self

    @property
    def is_spm(self) -> bool:
        return self.kind != "char"

    def to_meta(self) -> dict:
        """The options, as recorded in meta.json and in the prepared dir's cache key."""
        if not self.is_spm:
            return {"kind": "char"}
        return {
            "kind": self.kind,
            "model_type": MODEL_TYPES[self.kind],
            "requested_vocab_size": self.vocab_size,
            "character_coverage": self.character_coverage,
        }


def train(lines_file: Path, spec: TokenizerSpec, distinct_chars: int, seed: int = 0) -> bytes:
    """Train a SentencePiece model on a file of training lines; returns the serialized model."""
    sentencepiece = _sentencepiece()
    if spec.kind == "spm-char" and spec.vocab_size is None:
        # No cap: the vocabulary is whatever the coverage keeps (a soft limit no corpus reaches).
        size = distinct_chars + BYTE_PIECES + 2
    else:
        size = (spec.vocab_size or DEFAULT_PIECES) + BYTE_PIECES
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(seed)  # the line sample of a large split, and unigram's EM, repeat
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=str(lines_file),
            model_writer=model,
            model_type=MODEL_TYPES[spec.kind],
            vocab_size=size,
            character_coverage=spec.character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n"],
            allow_whitespace_only_pieces=True,
            split_digits=False,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            hard_vocab_limit=False,
            input_sentence_size=MAX_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=max(1, min(os.cpu_count() or 1, 16)),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(_explain(str(e), spec)) from None
    return model.getvalue()


def _explain(message: str, spec: TokenizerSpec) -> str:
    """A trainer failure as something a user can act on."""
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if m:
        need = int(m.group(2)) - BYTE_PIECES
        return (
            f"--vocab-size {spec.vocab_size or DEFAULT_PIECES} is too small: the characters kept at --character-coverage "
            f"{spec.character_coverage} need {need} pieces; use --vocab-size {need} or more, or a lower --character-coverage"
        )
    if "empty" in message.lower() or "no sentence" in message.lower():
        return "the training split has no text to train the tokenizer on; use a longer text"
    return f"SentencePiece could not train the {spec.kind} tokenizer: {message.splitlines()[0]}"


def fold_lines(text: str, column: int) -> tuple[str, int]:
    """Break lines longer than MAX_LINE characters (the trainer skips those); column: the open line's length so far."""
    out = []
    for k, line in enumerate(text.split("\n")):
        if k:
            out.append("\n")
            column = 0
        while column + len(line) > MAX_LINE:
            cut = MAX_LINE - column
            out += [line[:cut], "\n"]
            line, column = line[cut:], 0
        out.append(line)
        column += len(line)
    return "".join(out), column


class SpmVocab:
    """A trained SentencePiece model as a vocabulary: ids are SentencePiece piece ids.

    Decoding goes through a table of each piece's UTF-8 bytes (a byte piece is its byte), so a
    stream of ids decodes incrementally and a byte-fallback character comes out whole.
    """

    kind = "spm"

    def __init__(self, model_bytes: bytes, tokenizer: str):
        if tokenizer not in MODEL_TYPES:
            raise DataError(f"unknown SentencePiece tokenizer {tokenizer!r}; expected one of {', '.join(MODEL_TYPES)}")
        self.model_bytes = bytes(model_bytes)
        self.tokenizer = tokenizer
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        try:
            self._sp = _sentencepiece().SentencePieceProcessor(model_proto=self.model_bytes)
        except (RuntimeError, TypeError, OSError):
            raise DataError("the serialized SentencePiece model is corrupt") from None
        pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        self._bytes = [self._piece_bytes(i, p) for i, p in enumerate(pieces)]
        self.byte_ids = {int(p[3:5], 16): i for i, p in enumerate(pieces) if self._sp.is_byte(i)}
        if len(self.byte_ids) != BYTE_PIECES:
            raise DataError("the SentencePiece model has no byte fallback: it cannot encode every text (prepare the data again)")
        # A literal "▁" in the text would come back as a space: it goes in as its three byte pieces instead.
        self._space_ids = [self.byte_ids[b] for b in SPACE.encode()]

    def _piece_bytes(self, i: int, piece: str) -> bytes:
        if self._sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        if self._sp.is_unknown(i):
            return "\ufffd".encode()  # never produced by encoding (byte fallback), only if a model samples it
        if self._sp.is_control(i):
            return b""
        return piece.replace(SPACE, " ").encode()

    # -- serialisation --------------------------------------------------------------------
    def to_meta(self) -> dict:
        """The JSON record; the serialized model itself travels separately (a tensor, or a file)."""
        return {
            "kind": "spm",
            "tokenizer": self.tokenizer,
            "model_type": MODEL_TYPES[self.tokenizer],
            "vocab_size": len(self),
            "byte_pieces": BYTE_PIECES,
            "sha256": self.sha256,
        }

    @classmethod
    def from_meta(cls, meta: dict, model_bytes: bytes | None, where: str) -> "SpmVocab":
        """The vocabulary of a record plus its serialized model, checked against the record's sha256."""
        if model_bytes is None:
            raise DataError(f"{where} uses a SentencePiece tokenizer but holds no serialized model")
        digest = meta.get("sha256")
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise DataError(f"{where}: the SentencePiece vocabulary record has no valid sha256 (malformed)")
        if hashlib.sha256(model_bytes).hexdigest() != digest:
            raise DataError(f"{where}: the SentencePiece model does not match its recorded sha256 (corrupt)")
        tokenizer = meta.get("tokenizer", "bpe")
        if not isinstance(tokenizer, str) or tokenizer not in MODEL_TYPES:
            raise DataError(f"{where}: unknown SentencePiece tokenizer {str(tokenizer)[:40]!r} in the vocabulary record")
        vocab = cls(model_bytes, tokenizer)
        size = meta.get("vocab_size", len(vocab))
        if type(size) is not int or size != len(vocab):
            raise DataError(
                f"{where}: the vocabulary record says {str(size)[:40]} pieces, its SentencePiece model has {len(vocab)}"
            )
        return vocab

    def describe(self) -> str:
        """In a few words, for messages."""
        return (
            f"a {self.tokenizer} SentencePiece tokenizer of {len(self)} pieces ({BYTE_PIECES} bytes), sha256 {self.sha256[:12]}"
        )

    def __len__(self) -> int:
        return len(self._bytes)

    def __eq__(self, other) -> bool:
        return isinstance(other, SpmVocab) and self.sha256 == other.sha256

    def symbol(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def id_dtype(self):
        """Smallest unsigned dtype that holds every id."""
        return id_dtype_for(len(self))

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Token ids. Byte fallback encodes every character, so `unknown` never has anything to do."""
        ids: list[int] = []
        for k, part in enumerate(text.split(SPACE)):
            if k:
                ids += self._space_ids
            if part:
                ids += self._sp.encode(part)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        table = self._bytes
        return b"".join(table[int(i)] for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> Callable[[int], str]:
        """A function id -> text for streaming output; holds back a character's bytes until it is complete."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        table = self._bytes
        return lambda i: decoder.decode(table[int(i)])

    def stream_encoder(self) -> "StreamEncoder":
        return StreamEncoder(self)


class StreamEncoder:
    """Encode a text that arrives in chunks, as if it were one string.

    A newline is always a piece of its own, so no piece spans one: cutting after a newline changes
    nothing. Text is held back to the last newline, and encoded in slices of about SLICE characters
    to bound the Python lists SentencePiece returns. A line longer than MAX_PENDING is cut where it
    stands (its tokens may then differ at the cut; the text still decodes exactly).
    """

    SLICE = 1 << 20
    MAX_PENDING = 1 << 23

    def __init__(self, vocab: SpmVocab):
        self.vocab = vocab
        self.pending = ""

    def feed(self, text: str) -> np.ndarray:
        text = self.pending + text
        cut = text.rfind("\n") + 1
        if cut == 0 and len(text) > self.MAX_PENDING:
            cut = len(text)
        self.pending = text[cut:]
        return self._encode(text[:cut])

    def finish(self) -> np.ndarray:
        text, self.pending = self.pending, ""
        return self._encode(text)

    def _encode(self, text: str) -> np.ndarray:
        parts, start = [], 0
        while start < len(text):
            end = start + self.SLICE
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl >= start else end
            parts.append(self.vocab.encode(text[start:end]))
            start = end
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
