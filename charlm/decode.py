"""Sampling processors and the sampling loop, written against the Scorer protocol only."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from charlm import CharlmError
from charlm.scorer import Scorer


class Temperature:
    """Divide the logits by t: below 1 sharpens, above 1 flattens."""

    def __init__(self, t: float):
        if not t > 0:
            raise CharlmError(f"--temperature must be > 0 (got {t}); for deterministic decoding use --greedy")
        if not math.isfinite(t):
            raise CharlmError(f"--temperature must be a finite number (got {t})")
        if t < MIN_TEMPERATURE:
            # Below this float32 cannot divide by it (1e-320 rounds to 0: every logit -inf, NaN
            # probabilities); the limit of a temperature this small is greedy decoding anyway.
            raise CharlmError(f"--temperature must be at least {MIN_TEMPERATURE} (got {t}); for deterministic decoding use --greedy")
        self.t = t

    def __call__(self, logits: Tensor) -> Tensor:
        # Log-probs: the largest is at least -log(V), so it stays finite divided by any t >= 1e-30,
        # and softmax (which subtracts the largest) gets a finite maximum.
        return logits if self.t == 1.0 else logits / self.t


MIN_TEMPERATURE = 1e-30


class TopK:
    """Keep the k most likely symbols."""

    def __init__(self, k: int):
        if k < 1:
            raise CharlmError(f"--top-k must be at least 1 (got {k})")
        self.k = k

    def __call__(self, logits: Tensor) -> Tensor:
        if self.k >= logits.shape[-1]:
            return logits
        kth = torch.topk(logits, self.k, dim=-1).values[..., -1:]  # (B, 1)
        return logits.masked_fill(logits < kth, float("-inf"))


class TopP:
    """Keep the smallest set of most likely symbols whose probability reaches p (nucleus sampling)."""

    def __init__(self, p: float):
        if not 0 < p <= 1:  # NaN fails this too
            raise CharlmError(f"--top-p must be in (0, 1] (got {p})")
        self.p = p

    def __call__(self, logits: Tensor) -> Tensor:
        if self.p >= 1.0:
            return logits
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= self.p  # mass before this symbol already reaches p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))


def processors(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> list:
    """Applied in this order: temperature, then top-k, then top-p."""
    chain: list = [Temperature(temperature)]
    if top_k is not None:
        chain.append(TopK(top_k))
    if top_p is not None:
        chain.append(TopP(top_p))
    return chain


def sample(
    scorer: Scorer,
    prime: Tensor,
    length: int,
    chain: list | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    on_step: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Generate `length` ids after `prime` (1-D ids) for num_samples streams at once -> (N, length).

    The prime goes through the network in one forward call; then one step per generated symbol.
    """
    if length < 0:
        raise CharlmError(f"--length must be >= 0 (got {length})")
    if num_samples < 1:
        raise CharlmError(f"--num-samples must be at least 1 (got {num_samples})")
    chain = chain if chain is not None else []
    out = torch.empty((num_samples, length), dtype=torch.long)
    if length == 0:
        return out
    state = scorer.start(num_samples)
    logp, state = scorer.score(prime.view(1, -1).expand(num_samples, -1), state)
    logp = logp[:, -1]  # (N, V): the distribution after the whole prime
    for t in range(length):
        # No finiteness check per step (it costs ~5% of a small model's step): checkpoint.load refuses
        # weights whose outputs could overflow float32, so a loaded model's log-probs are finite.
        if greedy:
            nxt = logp.argmax(dim=-1)
        else:
            logits = logp
            for proc in chain:
                logits = proc(logits)
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        out[:, t] = nxt
        if on_step is not None:
            on_step(nxt)
        if t + 1 < length:
            logp, state = scorer.step(nxt, state)
    return out


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
        raise CharlmError(f"--length-penalty must be a number between -{MAX_LENGTH_PENALTY} and {MAX_LENGTH_PENALTY} "
                          f"(got {length_penalty}); 0 ranks by the total log-prob, 1 by the mean")
    state = scorer.start(1)
    logp, state = scorer.score(prime.view(1, -1), state)
    logp = logp[:, -1]  # (1, V)
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
            done = (seqs[:, -len(stop):] == torch.tensor(stop)).all(dim=1)
            finished += [(seqs[i].tolist(), float(scores[i])) for i in torch.nonzero(done).flatten().tolist()]
            keep = torch.nonzero(~done).flatten()
            rows, symbols, seqs, scores = rows[keep], symbols[keep], seqs[keep], scores[keep]
            if len(keep) == 0:
                break
        if t + 1 < length:
            state = scorer.reorder(state, rows.to(_state_device(state)))
            logp, state = scorer.step(symbols.to(_state_device(state)), state)
    finished += [(seqs[i].tolist(), float(scores[i])) for i in range(len(seqs))]

    def rank(item):
        ids, score = item
        return score / (max(len(ids), 1) ** length_penalty)

    return sorted(finished, key=rank, reverse=True)[:n_best]


def _check_finite(logp: Tensor, t: int) -> None:
    """Log-probs of finite weights are finite unless the weights overflow float32: then say so, never emit garbage."""
    if not bool(torch.isfinite(logp).all()):
        raise CharlmError(f"the model's output is not a finite number at step {t + 1} (NaN or infinite): "
                          "its weights overflow float32; this checkpoint cannot be used")


def _state_device(state) -> torch.device:
    """The device of the first tensor in a (possibly nested) state."""
    while isinstance(state, tuple):
        state = state[0]
    return state.device
