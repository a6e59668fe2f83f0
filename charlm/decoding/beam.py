"""Beam search for the most likely continuations, written against the Scorer protocol only."""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.decoding.scorer import Scorer, run_prime
from charlm.errors import CharlmError

MAX_LENGTH_PENALTY = 10.0  # len ** 10 stays finite for any length a beam reaches


def beam_search(
    scorer: Scorer,
    prime: Tensor,
    length: int,
    beam_width: int = 5,
    n_best: int = 1,
    length_penalty: float = 0.0,
    stop_at: Tensor | None = None,
) -> list[tuple[list[int], float]]:
    """The n_best most likely continuations of `prime` (1-D ids), as (ids, total log-prob), best first.

    All live hypotheses advance together as one batch: one scorer.step per generated symbol, the
    states gathered with scorer.reorder. A hypothesis ending in `stop_at` is finished (it keeps
    the stop text). Ranking divides the total log-prob by len**length_penalty (0: raw total).
    """
    if beam_width < 1:
        raise CharlmError(f"--beam-width must be at least 1 (got {beam_width})")
    if n_best < 1 or n_best > beam_width:
        raise CharlmError(f"--n-best must be between 1 and --beam-width ({beam_width}) (got {n_best})")
    if length < 1:
        raise CharlmError(f"--length must be at least 1 (got {length})")
    if not -MAX_LENGTH_PENALTY <= length_penalty <= MAX_LENGTH_PENALTY:  # NaN fails this too
        raise CharlmError(
            f"--length-penalty must be a number between -{MAX_LENGTH_PENALTY} and {MAX_LENGTH_PENALTY} "
            f"(got {length_penalty}); 0 ranks by the total log-prob, 1 by the mean"
        )
    logp, state = run_prime(scorer, prime)  # (1, V)
    vocab_size = logp.shape[-1]
    scores = torch.zeros(1)  # (K,) total log-prob of each live hypothesis
    seqs = torch.zeros((1, 0), dtype=torch.long)  # (K, t)
    finished: list[tuple[list[int], float]] = []
    stop = stop_at.tolist() if stop_at is not None and len(stop_at) else None
    for t in range(length):
        _check_finite(logp, t)
        candidates = (scores.unsqueeze(1) + logp.float().cpu()).view(-1)  # (K * V,)
        top = torch.topk(candidates, min(beam_width, candidates.numel()))
        rows = torch.div(top.indices, vocab_size, rounding_mode="floor")
        symbols = top.indices % vocab_size
        seqs = torch.cat([seqs[rows], symbols.unsqueeze(1)], dim=1)
        scores = top.values
        if stop is not None and seqs.shape[1] >= len(stop):
            done = (seqs[:, -len(stop) :] == torch.tensor(stop)).all(dim=1)
            finished += [(seqs[i].tolist(), float(scores[i])) for i in torch.nonzero(done).flatten().tolist()]
            keep = torch.nonzero(~done).flatten()
            rows, symbols, seqs, scores = rows[keep], symbols[keep], seqs[keep], scores[keep]
            if len(keep) == 0:
                break
        if t + 1 < length:
            state = scorer.reorder(state, rows)  # CPU indices: each scorer moves them to its own device
            logp, state = scorer.step(symbols, state)
    finished += [(seqs[i].tolist(), float(scores[i])) for i in range(len(seqs))]

    def rank(item):
        ids, score = item
        return score / (max(len(ids), 1) ** length_penalty)

    return sorted(finished, key=rank, reverse=True)[:n_best]


def _check_finite(logp: Tensor, t: int) -> None:
    """Log-probs of finite weights are finite unless the weights overflow float32: then say so, never emit garbage."""
    if not bool(torch.isfinite(logp).all()):
        raise CharlmError(
            f"the model's output is not a finite number at step {t + 1} (NaN or infinite): "
            "its weights overflow float32; this checkpoint cannot be used"
        )
