"""Sampling processors (temperature -> top-k -> top-p) and the sampling loop, written against the Scorer protocol only."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from charlm.cells import native_ops
from charlm.decoding.scorer import Scorer, run_prime
from charlm.errors import OptionError


class Temperature:
    """Divide the logits by t: below 1 sharpens, above 1 flattens."""

    def __init__(self, t: float):
        if not t > 0:
            raise OptionError(f"--temperature must be > 0 (got {t}); for deterministic decoding use --greedy")
        if not math.isfinite(t):
            raise OptionError(f"--temperature must be a finite number (got {t})")
        if t < MIN_TEMPERATURE:
            # Below this float32 cannot divide by it (1e-320 rounds to 0: every logit -inf, NaN
            # probabilities); the limit of a temperature this small is greedy decoding anyway.
            raise OptionError(
                f"--temperature must be at least {MIN_TEMPERATURE} (got {t}); for deterministic decoding use --greedy"
            )
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
            raise OptionError(f"--top-k must be at least 1 (got {k})")
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
            raise OptionError(f"--top-p must be in (0, 1] (got {p})")
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


def draw(logits: Tensor, uniforms: Tensor) -> Tensor:
    """One symbol per row of logits (B, V), by inverting the row's cumulative distribution at its
    uniform number in [0, 1) (B,), float64. A row's draw depends on that row and its number only, so
    a stream samples the same text alone or beside others (charlm/decoding/streams.py)."""
    cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)  # (B, V); float64: 1e-16 steps, not 1e-7
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)  # (B, 1), below the row's total
    # The first symbol whose cumulative mass exceeds the target: never one of probability 0 (masked by top-k/top-p).
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)


def temperature_only(chain: list, vocab_size: int) -> float | None:
    """The temperature when it is all a chain does (top-k of the whole vocabulary and top-p 1 keep every
    symbol), for draw_one; None when a processor masks symbols."""
    t = None
    for proc in chain:
        if isinstance(proc, Temperature):
            t = proc.t
        elif not ((isinstance(proc, TopK) and proc.k >= vocab_size) or (isinstance(proc, TopP) and proc.p >= 1.0)):
            return None
    return t


def draw_one(logp: Tensor, temperature: float, u: float) -> int:
    """draw() of one row of log-probs (or logits) (V,) at a temperature, with its uniform number: one native
    call where the library is built (cells/native.py), else the processors and draw() themselves."""
    if logp.device.type == "cpu" and logp.dtype == torch.float32 and logp.is_contiguous():
        symbol = native_ops.draw(logp, temperature, u)
        if symbol >= 0:
            return symbol
    logits = Temperature(temperature)(logp.unsqueeze(0))
    return int(draw(logits, torch.tensor([u], dtype=torch.float64))[0])


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

    The prime goes through the network in whole-window forward calls (run_prime); then one step per generated symbol.
    The streams share one generator (the API's Streams gives each stream its own).
    """
    if length < 0:
        raise OptionError(f"--length must be >= 0 (got {length})")
    if num_samples < 1:
        raise OptionError(f"--num-samples must be at least 1 (got {num_samples})")
    chain = chain if chain is not None else []
    out = torch.empty((num_samples, length), dtype=torch.long)
    if length == 0:
        return out
    logp, state = run_prime(scorer, prime, num_samples)  # (N, V): the distribution after the whole prime
    only_t = temperature_only(chain, logp.shape[-1]) if num_samples == 1 else None
    for t in range(length):
        # No finiteness check per step (it costs ~5% of a small model's step): checkpoint.load refuses
        # weights whose outputs could overflow float32, so a loaded model's log-probs are finite.
        if greedy:
            nxt = logp.argmax(dim=-1)
        elif only_t is not None:  # one stream, temperature only: one call (the same uniform, the same rule)
            u = float(torch.rand(1, generator=generator, dtype=torch.float64))
            nxt = torch.tensor([draw_one(logp[0], only_t, u)])
        else:
            logits = logp
            for proc in chain:
                logits = proc(logits)
            nxt = draw(logits, torch.rand(num_samples, generator=generator, dtype=torch.float64))
        out[:, t] = nxt
        if on_step is not None:
            on_step(nxt)
        if t + 1 < length:
            logp, state = scorer.step(nxt, state)
    return out
