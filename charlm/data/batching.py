"""Truncated-BPTT batching of a token stream: training windows and evaluation windows."""

from __future__ import annotations

import numpy as np
import torch

from charlm.errors import DataError


# Truncated BPTT layout. The split's n tokens become B contiguous rows of L = (n-1) // B steps;
# targets are the same rows shifted by one. Window k holds columns [kT, kT+T) of every row, so
# row i of window k+1 continues row i of window k, and the hidden state of row i is carried across.
#
#   stream:   a b c d e f g h i j k l m n o p q r s t u v w x ...
#
#              window 0   window 1   window 2
#   row 0  | a b c d  | e f g h  | i j k l  |      (B = 3, T = 4, L = 12)
#   row 1  | m n o p  | q r s t  | u v w x  |
#   row 2  | y z ...  |          |          |
#
# Data-parallel (distributed.py): the same layout with B = world_size x b rows, and rank r keeps
# rows [r*b, (r+1)*b) for the whole run, so every row's state stays on one rank and the ranks
# together take exactly the windows one process with batch B would:
#
#   rank 0: rows 0 .. b-1  |  rank 1: rows b .. 2b-1  |  ...  (same windows, same length everywhere)
#
class StreamBatcher:
    """Windows of (inputs, targets), each (B, T), over one token stream; `rows` keeps a slice of the B rows."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_length: int, what: str = "the training split", rows: slice | None = None
    ):
        n = len(tokens)
        self.batch_size, self.seq_length = batch_size, seq_length
        self.row_length = (n - 1) // batch_size if n > 1 else 0
        if self.row_length < seq_length:
            need = batch_size * seq_length + 1
            raise DataError(
                f"{what} has {n:,} tokens, fewer than one batch needs ({batch_size} rows x {seq_length} steps + 1 = "
                f"{need:,}); use a longer text or lower --batch-size / --seq-length"
            )
        usable = batch_size * self.row_length
        rows = rows or slice(None)
        # Views into the memmap: no copy of the corpus, one small (B, T) copy per window.
        self.inputs = np.asarray(tokens[:usable]).reshape(batch_size, self.row_length)[rows]
        self.targets = np.asarray(tokens[1 : usable + 1]).reshape(batch_size, self.row_length)[rows]

    def __len__(self) -> int:
        """Full windows per epoch (the ragged tail of each row is left for the next epoch's layout)."""
        return self.row_length // self.seq_length

    def window(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = k * self.seq_length
        hi = lo + self.seq_length
        x = torch.from_numpy(self.inputs[:, lo:hi].astype(np.int64))  # (B, T)
        y = torch.from_numpy(self.targets[:, lo:hi].astype(np.int64))  # (B, T)
        return x, y


def row_span(tokens: np.ndarray, num_rows: int, lo: int, hi: int) -> np.ndarray:
    """The stretch of a stream that holds rows [lo, hi) of its num_rows-row layout, last target included.

    Cut into hi - lo rows it gives back exactly those rows: one rank's share of the validation streams.
    """
    row = (len(tokens) - 1) // num_rows if len(tokens) > 1 else 0
    return tokens[lo * row : hi * row + 1]


def eval_windows(tokens: np.ndarray, batch_size: int, seq_length: int):
    """Every (inputs, targets) window of a stream cut into batch_size rows, ragged last window included."""
    n = len(tokens)
    row = (n - 1) // batch_size if n > 1 else 0
    if row == 0:
        return
    usable = batch_size * row
    inputs = np.asarray(tokens[:usable]).reshape(batch_size, row)
    targets = np.asarray(tokens[1 : usable + 1]).reshape(batch_size, row)
    for lo in range(0, row, seq_length):
        hi = min(lo + seq_length, row)
        yield (
            torch.from_numpy(inputs[:, lo:hi].astype(np.int64)),
            torch.from_numpy(targets[:, lo:hi].astype(np.int64)),
        )
