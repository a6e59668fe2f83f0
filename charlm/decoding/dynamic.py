"""Dynamic evaluation (Krause et al., ICML 2018): the model adapts to the text while scoring it.

The text is one stream cut into windows of n tokens (by default the checkpoint's training
window), the recurrent state carried through. Each window is scored first, with the weights as
they are, and only then does the model take a gradient step on that window's mean loss, so later
text is scored by a model that has adapted to what it has read, and no window is ever scored by
weights that have seen it. Two update rules, with theta_0 the trained weights:

    sgd  theta <- theta - lr * g + decay * (theta_0 - theta)
    rms  theta <- theta - lr * g / (sqrt(MS) + EPSILON) + min(decay * sqrt(MS) / mean(sqrt(MS)), 1) * (theta_0 - theta)

`rms` is the paper's RMS-normalised update: MS is the mean squared gradient of the training
loss, per weight. Krause et al. collect it over training batches after training; here it is the
AdamW second moment the training run kept (its exp_avg_sq, bias-corrected: an average of the
squared gradients of the last ~1000 training batches, each the mean loss of a batch of windows),
read from a resumable checkpoint (last.safetensors). The decay toward theta_0 is per weight,
scaled by its RMS over the mean RMS of all weights, clipped at 1 so that it never overshoots
theta_0 (the paper's clipping at 1/decay). A checkpoint without optimizer state (best.safetensors,
an exported file) has no such statistics: plain `sgd` then, and the caller says so.

The adapting weights are a copy in memory: a checkpoint file is never written. Works through
CharRNN.forward, so through any registered cell, in fp32, in eval mode (no dropout; on CUDA with
cuDNN off, whose RNN backward needs training mode). An ensemble's members each adapt on their own
loss, with their own copy and statistics; the ensemble's figure combines what each member
predicted before its step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from charlm import checkpoint  # owns the training state's key names (the optimizer's statistics)
from charlm.cells import native_ops
from charlm.data import eval_windows
from charlm.decoding.evaluate import bits_per_char
from charlm.decoding.options import DYN_DEFAULTS, DYN_UPDATES, check_dynamic_options
from charlm.errors import CharlmError
from charlm.model import CharRNN, detach

UPDATES = DYN_UPDATES
DEFAULTS = DYN_DEFAULTS  # per rule: (lr, decay)
EPSILON = 1e-5  # added to sqrt(MS): bounds the step of weights whose training gradients were ~0 (rare symbols)


@dataclass
class AdaptSource:
    """What a checkpoint offers dynamic evaluation: its training window and, if kept, the gradient statistics."""

    window: int  # the training window (seq_length): the default window for adaptation
    mean_sq: list[Tensor] | None  # per parameter (model.parameters() order): bias-corrected AdamW exp_avg_sq


def adapt_source(ckpt) -> AdaptSource:
    """The window and statistics of a loaded Checkpoint (None statistics: it holds no optimizer state)."""
    return AdaptSource(int(ckpt.meta["train"]["seq_length"]), checkpoint.gradient_second_moments(ckpt))


@dataclass
class Settings:
    update: str  # rms or sgd
    lr: float
    decay: float
    window: int


check_options = check_dynamic_options  # the flags' own ranges, before anything is loaded


def resolve(
    sources: list[AdaptSource], names: list[str], update: str, lr: float | None, decay: float | None, window: int | None
) -> tuple[Settings, str | None]:
    """The settings for these members, and a note when the RMS update falls back to plain SGD."""
    check_options(update, lr, decay, window)
    lacking = [name for name, s in zip(names, sources) if s.mean_sq is None]
    note = None
    if update == "rms" and lacking:
        raise CharlmError(
            f"--dyn-update rms needs the training gradient statistics, which {lacking[0]} does not hold "
            "(no optimizer state: a best or exported file); use last.safetensors, or --dyn-update sgd"
        )
    if update == "auto":
        update = "sgd" if lacking else "rms"
        if lacking:
            note = (
                f"{lacking[0]} holds no optimizer state, so no training gradient statistics: dynamic evaluation uses "
                "plain SGD (give last.safetensors for the RMS-normalised update)"
            )
    default_lr, default_decay = DEFAULTS[update]
    settings = Settings(
        update,
        default_lr if lr is None else lr,
        default_decay if decay is None else decay,
        sources[0].window if window is None else window,
    )
    return settings, note


class Adapter:
    """One model adapting to a text: its trained weights kept aside, the update rule's per-weight scales."""

    def __init__(self, model: CharRNN, settings: Settings, mean_sq: list[Tensor] | None = None):
        self.model, self.settings = model.eval(), settings
        self.params = list(model.parameters())
        self.theta0 = [p.detach().clone() for p in self.params]
        self.step_scale: list[Tensor] | None = None
        self.decay_rate: list[Tensor] | float = settings.decay
        if settings.update == "rms":
            if mean_sq is None or [m.shape for m in mean_sq] != [p.shape for p in self.params]:
                raise CharlmError("the RMS-normalised update needs gradient statistics for every parameter of the model")
            rms = [m.to(p.device).clamp_min(0).sqrt() for m, p in zip(mean_sq, self.params)]
            mean_rms = float(sum(r.sum() for r in rms)) / sum(r.numel() for r in rms)
            self.step_scale = [1.0 / (r + EPSILON) for r in rms]
            self.decay_rate = [(settings.decay * r / max(mean_rms, 1e-30)).clamp(max=1.0) for r in rms]
        self._cuda = self.params[0].device.type == "cuda"

    def score_and_learn(self, x: Tensor, y: Tensor, state) -> tuple[Tensor, tuple]:
        """The window's log-probs (B, T, V) under the weights as they are, then one step on its mean loss."""
        device = self.params[0].device
        x, y = x.to(device), y.to(device)
        learn = self.settings.lr > 0
        no_cudnn = torch.backends.cudnn.flags(enabled=False) if self._cuda else contextlib.nullcontext()
        with torch.enable_grad() if learn else torch.no_grad(), no_cudnn:
            logits, state = self.model(x, state)
            logp = F.log_softmax(logits.float(), dim=-1)
            if learn:
                loss = F.nll_loss(logp.reshape(-1, logp.shape[-1]), y.reshape(-1))
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                self._update(grads)
        return logp.detach(), detach(state)

    @torch.no_grad()
    def _update(self, grads) -> None:
        lr, decay = self.settings.lr, self.decay_rate
        for i, (p, g, p0) in enumerate(zip(self.params, grads, self.theta0)):
            d = decay if isinstance(decay, float) else decay[i]
            scale = None if self.step_scale is None else self.step_scale[i]
            if g is not None and native_ops.dyn_update(p, g, scale, p0, d, lr):
                continue  # the same operations in one pass over memory (cells/native.py), bit for bit
            pull = p0 - p  # toward the trained weights, from where the weights were before this step
            if g is not None:
                p.sub_(lr * (g if scale is None else g * scale))
            p.add_(pull * d)


def figures(nll: float, tokens: int, chars: float, seconds: float) -> dict:
    """An evaluation record as evaluate() writes it, with the scoring speed."""
    bpc = bits_per_char(nll, chars)
    return {
        "bits_per_char": bpc,
        "perplexity": 2.0**bpc,
        "chars": int(round(chars)),
        "tokens": tokens,
        "nll": nll,
        "bits_per_token": bits_per_char(nll, tokens),
        "chars_per_s": chars / max(seconds, 1e-9),
    }


def dynamic_evaluate(
    adapters: list[Adapter],
    tokens: np.ndarray,
    chars: float | None = None,
    combine: Callable[[Tensor], Tensor] | None = None,
    record: list | None = None,
) -> tuple[dict, list[dict]]:
    """Score tokens as one stream while every adapter adapts: (the combined record, one record per member).

    combine: the members' stacked log-probs (M, B, T, V) -> the ensemble's (B, T, V); one member: itself.
    record: a list that gets each window's per-token NLL (1, T), for tests and plots.
    """
    window = adapters[0].settings.window
    combine = combine or (lambda stacked: stacked[0])
    states = [a.model.init_state(1) for a in adapters]
    nll, member_nll, n = 0.0, [0.0] * len(adapters), 0
    start = time.perf_counter()
    for x, y in eval_windows(tokens, 1, window):
        logps = []
        for j, a in enumerate(adapters):
            logp, states[j] = a.score_and_learn(x, y, states[j])
            member_nll[j] -= float(logp.gather(-1, y.unsqueeze(-1).to(logp.device)).sum())
            logps.append(logp)
        mixed = combine(torch.stack(logps)) if len(adapters) > 1 else logps[0]
        token_nll = -mixed.gather(-1, y.unsqueeze(-1).to(mixed.device)).squeeze(-1)
        nll += float(token_nll.sum())
        if record is not None:
            record.append(token_nll.cpu())
        n += y.numel()
    seconds = time.perf_counter() - start
    chars = n if chars is None else chars
    return figures(nll, n, chars, seconds), [figures(v, n, chars, seconds) for v in member_nll]
