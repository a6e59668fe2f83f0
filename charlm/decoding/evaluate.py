"""Bits per character (and perplexity) of a Scorer over a token stream.

Figures are per character of the raw text whatever the unit, so a SentencePiece model and a
character model are on one scale: total NLL over the scored tokens divided by the number of
characters those tokens spell (counted on the text, not estimated from the tokens).
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from charlm.data import eval_windows
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.scorer import ModelScorer, Scorer


def bits_per_char(nll: float, chars: float) -> float:
    """Total negative log-likelihood in nats over the characters it covers -> bits per character: every figure charlm reports."""
    return nll / math.log(2) / chars if chars else math.nan


@torch.inference_mode()
def evaluate(
    scorer: Scorer,
    tokens: np.ndarray,
    chars_per_token: float = 1.0,
    streams: int = 1,
    window: int = 512,
    chars: int | None = None,
    record: list | None = None,
    rows: int | None = None,
) -> dict:
    """Score every token after the first given the ones before it, the state carried through.

    streams=1 scores the text as one stream (exact): a long text is cut into `rows` rows run side by
    side and every cut is then mended so that the figures are the one stream's (exact_rows; rows=None
    picks the count, rows=1 runs the single stream). More streams cut it into that many rows scored
    side by side with no mending (faster; each row's first token has no context: training's
    validation). `chars`: the characters the scored tokens spell (see scored_chars); without it,
    scored tokens x chars_per_token.
    """
    nll = 0.0
    n = 0
    per_window: Iterable[Tensor] | None = None
    if streams == 1 and (rows is None or rows > 1) and row_splittable(scorer):
        per_window = exact_rows(scorer, tokens, rows)
    if per_window is None:
        per_window = _windows(scorer, tokens, streams, window)
    for token_logp in per_window:
        nll -= float(token_logp.sum())
        if record is not None:
            record.append(token_logp.cpu())
        n += token_logp.numel()
    if n == 0:
        return {
            "bits_per_char": float("nan"),
            "perplexity": float("nan"),
            "chars": 0,
            "tokens": 0,
            "nll": 0.0,
            "bits_per_token": float("nan"),
        }
    spelled = n * chars_per_token if chars is None else chars
    bpc = bits_per_char(nll, spelled)
    return {
        "bits_per_char": bpc,
        "perplexity": 2.0**bpc,  # per character
        "chars": int(round(spelled)),
        "tokens": n,
        "nll": nll,
        "bits_per_token": bits_per_char(nll, n),  # the same formula, per token
    }


def _windows(scorer: Scorer, tokens: np.ndarray, streams: int, window: int, state=None) -> Iterator[Tensor]:
    """Each window's scored tokens' log-probs (B, T), the text cut into `streams` rows (eval_windows)."""
    state = scorer.start(streams) if state is None else state
    for x, y in eval_windows(tokens, streams, window):
        logp, state = scorer.score(x, state)  # (B, T, V)
        yield logp.gather(-1, y.unsqueeze(-1).to(logp.device)).squeeze(-1)  # (B, T)


# One stream over a long text, in rows. Stepping one stream reads every weight once per symbol and
# does little else with it; R rows read them once for R symbols, which is several times faster
# until the arithmetic is the limit (measured: docs/performance.md). The text is cut into R rows,
# each started from a zero state, then every cut is mended:
#
#   pass 1 (R rows at once, from zero states)     mending (rows 1..R-1 at once, from the true states)
#   row 0 | a b c d | e f g h | ...  -> end h0     row 1 from h0 | m n o p | -> state == pass 1's? done
#   row 1 | m n o p | q r s t | ...  -> end h1     row 2 from h1 | y z . . | -> not yet: next window, ...
#   row 2 | y z . . | . . . . | ...
#
# Row r's true starting state is row r-1's state at its end. Mending re-runs the start of every row
# from that state, window by window, replacing pass 1's log-probs, until the state it reaches agrees
# with pass 1's at the same place (to MEND_TOL, the size of fp32 rounding; an LSTM cell state that
# both runs hold saturated counts as agreeing: see SATURATED): from there on the two runs are one up
# to rounding, so pass 1's log-probs are the single stream's, and so is each row's end state, the
# next row's start. A row that has not agreed after MEND_WINDOWS windows (or a quarter of its row,
# where more, at most MAX_MEND_WINDOWS: a model with a very long memory) sends the whole text back
# through the single stream: the figures are the single stream's either way, only the time differs.
# Measured (tests/test_one_stream.py, docs/performance.md): bits/char within 1e-7 of the single stream.
ROW_WINDOW = 128  # steps per window in rows: the (R, T, 4H) gate buffers stay in the caches
MAX_ROWS = 16  # past ~16 rows the products are compute-bound on a CPU core: more rows add nothing
MIN_ROW_WINDOWS = 8  # each row at least this many windows, so mending (about one window per row) costs <= 1/8
MEND_WINDOWS = 8  # windows a row may take to agree before the text goes through the single stream, at least
MEND_SHARE = 4  # or, where more, 1/MEND_SHARE of the row: mending then costs at most that share of pass 1
MAX_MEND_WINDOWS = 64  # and at most this many (pass 1 keeps the state after each for the comparisons)
MEND_TOL = 1e-5  # |mended - pass 1| <= MEND_TOL * (1 + |pass 1|), every state value of the row: fp32 rounding
# alone (another batch shape, another summation order) leaves runs ~1e-6 apart in a trained model


def row_splittable(scorer: Scorer) -> bool:
    """Whether exact_rows can score for this scorer: one model, or an ensemble of models over one vocabulary
    (a union-vocabulary ensemble skips positions per member and scores one text in its rows only)."""
    if isinstance(scorer, ModelScorer):
        return scorer.dtype == "fp32"  # bf16 scoring differs between batch shapes by more than the mending's tolerance
    return (
        isinstance(scorer, Ensemble)
        and not scorer.union
        and all(isinstance(m, ModelScorer) and m.dtype == "fp32" for m in scorer.members)
    )


def exact_rows(scorer: Scorer, tokens: np.ndarray, rows: int | None = None) -> list[Tensor] | None:
    """The one stream's per-token log-probs (a list of (1, T) tensors, in text order) computed in rows
    (see above); None when the text is too short for rows to pay, or a row did not agree in time."""
    T = ROW_WINDOW
    n = len(tokens)
    if rows is None:
        rows = min(MAX_ROWS, (n - 1) // (T * MIN_ROW_WINDOWS))
    if rows < 2 or (n - 1) // rows < 1:
        return None
    row = (n - 1) // rows
    usable = rows * row
    inputs = np.asarray(tokens[:usable]).reshape(rows, row)  # views: a window at a time is made int64
    targets = np.asarray(tokens[1 : usable + 1]).reshape(rows, row)

    def window(part: np.ndarray) -> Tensor:
        return torch.from_numpy(part.astype(np.int64))

    scored = torch.empty(rows, row)  # every token's log-prob, rows x columns (what `record` keeps anyway)
    limit = min(MAX_MEND_WINDOWS, max(MEND_WINDOWS, row // (T * MEND_SHARE)))  # windows a row may take to agree
    saved = []  # the state after each of the first `limit` windows, for the mending's comparisons
    state = scorer.start(rows)
    for k, lo in enumerate(range(0, row, T)):
        hi = min(lo + T, row)
        logp, state = scorer.score(window(inputs[:, lo:hi]), state)
        scored[:, lo:hi] = logp.gather(-1, window(targets[:, lo:hi]).unsqueeze(-1).to(logp.device)).squeeze(-1).cpu()
        if k < limit:
            saved.append(state)
    ends = state
    # Mending: rows 1..R-1 from the end states of rows 0..R-2.
    saturating = _saturating(scorer)
    live = torch.arange(1, rows)
    mend = scorer.reorder(ends, live - 1)
    for k, lo in enumerate(range(0, row, T)):
        if k >= limit:
            return None  # not agreed in time: the caller runs the single stream
        hi = min(lo + T, row)
        rows_live = live.numpy()
        logp, mend = scorer.score(window(inputs[rows_live, lo:hi]), mend)
        scored[live, lo:hi] = logp.gather(-1, window(targets[rows_live, lo:hi]).unsqueeze(-1).to(logp.device)).squeeze(-1).cpu()
        agreed = _rows_agree(mend, scorer.reorder(saved[k], live), saturating)
        if bool(agreed.all()):
            break
        keep = torch.nonzero(~agreed).flatten()
        live, mend = live[keep], scorer.reorder(mend, keep)
    else:  # a row mended to its end without agreeing: its end state, the next row's start, was pass 1's
        return None
    out = [scored.view(1, -1)]
    if usable + 1 < n:  # the tail after the rows, from the last row's end state
        last = scorer.reorder(ends, torch.tensor([rows - 1]))
        out += list(_windows(scorer, np.asarray(tokens[usable:]), 1, 512, last))
    return out


def _tensors(state) -> list[Tensor]:
    return [state] if isinstance(state, Tensor) else [t for part in state for t in _tensors(part)]


# An LSTM's cell state reaches the rest of the model only through tanh(c), which is exactly +-1 in
# fp32 beyond |c| = 9.1 (1 - tanh(9.1) < 2^-25, half an ulp below 1); a "counter" unit that never
# forgets holds hundreds there, and two runs started apart keep different counts for ever. Such a
# unit agrees when both runs hold it beyond SATURATED with one sign.
SATURATED = 9.5


def _saturating(scorer: Scorer) -> list[bool]:
    """Per state tensor (in _tensors order): whether it is a plain LSTM's cell state (see SATURATED)."""
    members = [m for m in (scorer.members if isinstance(scorer, Ensemble) else [scorer]) if isinstance(m, ModelScorer)]
    return [m.model.rnn.name == "lstm" and name == "c" for m in members for name in m.model.rnn.state_names]


def _rows_agree(a, b, saturating: list[bool]) -> Tensor:
    """Per row (dim 1 of every state tensor): whether two states agree to MEND_TOL. (B,) bool."""
    ok = None
    for x, y, sat in zip(_tensors(a), _tensors(b), saturating):
        close = (x - y).abs() <= MEND_TOL * (1 + y.abs())
        if sat:
            close |= (x.abs() >= SATURATED) & (y.abs() >= SATURATED) & ((x > 0) == (y > 0))
        close = close.transpose(0, 1).reshape(x.shape[1], -1).all(dim=1)
        ok = close if ok is None else ok & close
    assert ok is not None
    return ok.cpu()


def scored_chars(vocab, tokens: np.ndarray, text_chars: int) -> int:
    """The characters the tokens scored with one stream spell: the text's, less those of the first token (the context).

    A character vocabulary has one token per character (a byte, for a byte vocabulary). A
    SentencePiece piece spells several, or part of one (a byte piece): only the first token's
    complete characters are left out.
    """
    if len(tokens) < 2:
        return 0
    if vocab.kind != "spm":
        return text_chars - 1
    return text_chars - len(vocab.stream_decoder()(int(tokens[0])))
