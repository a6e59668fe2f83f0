"""A prepared dir on disk: meta.json plus one memory-mapped token file per split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from charlm.data.format import DATA_FORMAT, SPLITS
from charlm.errors import DataError
from charlm.tokenizers.vocab import load_vocab


class PreparedData:
    """A prepared dir: meta.json plus one memory-mapped token file per split."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{self.dir} is not a prepared data dir (no meta.json); run: charlm prepare INPUT -o DIR")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DataError(f"{meta_path} is corrupt; prepare the data again") from None
        if self.meta.get("format") != DATA_FORMAT:
            raise DataError(f"{meta_path} was not written by charlm prepare")
        self.vocab = load_vocab(self.meta["vocab"], self._tokenizer_model(), where=str(self.dir))

    def _tokenizer_model(self) -> bytes | None:
        """The serialized SentencePiece model meta.json names, if any."""
        name = (self.meta.get("tokenizer") or {}).get("file")
        if not name:
            return None
        path = self.dir / name
        if not path.exists():
            raise DataError(f"{path} is missing; prepare the data again")
        return path.read_bytes()

    def tokens(self, split: str) -> np.ndarray:
        """The split's ids as a read-only memmap (an empty array for an empty split)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        path = self.dir / f"{split}.bin"
        if not path.exists():
            raise DataError(f"{path} is missing; prepare the data again")
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(path, dtype=self.meta["dtype"], mode="r")

    def chars(self, split: str) -> int:
        return int(self.meta["splits"][split]["chars"])
