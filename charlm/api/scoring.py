"""Turning what a caller asks to score into tokens (a text, bytes, or a split of the prepared data a
checkpoint records), and scoring tokens as one stream: LanguageModel.score's parts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from charlm.api.results import Score
from charlm.decoding.evaluate import evaluate
from charlm.decoding.options import check_unknown
from charlm.decoding.scorer import Scorer
from charlm.errors import CharlmError, DataError, OptionError


def static_score(scorer: Scorer, tokens: np.ndarray, chars: int) -> Score:
    """A scorer's figures on tokens scored as one stream, with each token's log-probability and the time taken."""
    record: list[torch.Tensor] = []
    start = time.perf_counter()
    r = evaluate(scorer, tokens, chars=chars, record=record)
    seconds = time.perf_counter() - start
    logprobs = torch.cat(record, dim=-1).flatten().numpy() if record else np.zeros(0)
    return Score(r["bits_per_char"], r["perplexity"], r["chars"], r["tokens"], r["nll"], r["bits_per_token"], seconds, logprobs)


def text_tokens(
    vocab, checkpoints: list, text: str | bytes | None, split: str | None, data: str | Path | None, unknown: str
) -> tuple[np.ndarray, int]:
    """The token stream to score and the number of characters of the text it spells."""
    check_unknown(unknown)
    if text is not None and split is not None:
        raise OptionError("score a text or a split, not both")
    if text is not None:
        if isinstance(text, bytes):
            if vocab.kind == "bytes":
                ids = vocab.encode_units(np.frombuffer(text, dtype=np.uint8).astype(np.uint32), unknown)
                return ids, len(ids)
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"the text is not valid UTF-8 (byte offset {e.start})") from None
        if not isinstance(text, str):
            raise OptionError(f"text must be a str or bytes (got {type(text).__name__})")
        if not text:
            raise DataError("the text to score is empty")
        ids = vocab.encode(text, unknown)
        # With unknown="skip" (char vocabularies), the figure covers the kept characters only.
        return ids, len(text) if vocab.kind == "spm" else len(ids)
    return split_tokens(vocab, checkpoints, split or "val", data)


def split_tokens(vocab, checkpoints: list, split: str, data_dir: str | Path | None) -> tuple[np.ndarray, int]:
    """A split of the prepared data the (first) checkpoint records, as tokens of `vocab` and the characters they spell."""
    from charlm.data import PreparedData  # only for splits: scoring a text needs no data code

    first = checkpoints[0]
    recorded = (first.meta.get("provenance") or {}).get("data_dir")
    if data_dir is None and not isinstance(recorded, str):
        raise CharlmError(
            f"{first.path} does not record the data it was trained on; give it with --data DIR, or score a file with --text"
        )
    data = PreparedData(data_dir if data_dir is not None else str(recorded))
    parts = split.split("+")
    tokens = np.concatenate([np.asarray(data.tokens(s)) for s in parts])
    if data.vocab != vocab:
        # A union-vocabulary ensemble reads a member's data: its symbols are all in the union.
        mapped = vocab.lookup(data.vocab.codes) if data.vocab.kind == vocab.kind != "spm" else None
        if mapped is None or bool((mapped < 0).any()):
            raise DataError(f"{data.dir} has a different vocabulary than {first.path}")
        tokens = mapped[tokens]
    return tokens, sum(data.chars(s) for s in parts)
