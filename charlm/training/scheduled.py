"""Scheduled sampling (Bengio et al., NIPS 2015), the parallel way (Duckworth et al., 2019).

A model trained only on the true previous character (teacher forcing) is run on its own
predictions when it generates. Scheduled sampling feeds it, during training, its own prediction
instead of the true character with a probability 1 - eps_i that grows with the step i, where
eps_i, the teacher-forcing probability, follows one of the paper's three decays, never below a
floor (`--ss-floor`; always sampling fails):

    linear           eps_i = max(floor, 1 - i / k)        k >= 1: the steps it takes to fall from 1 to 0
    exponential      eps_i = max(floor, k ** i)           0 < k < 1: the factor per step
    inverse-sigmoid  eps_i = max(floor, k / (k + exp(i / k)))   k >= 1: eps is 1/2 at i = k ln k

(the paper's linear decay is max(eps, k - c i); here its offset is 1 and its slope 1/k.)

The parallel way keeps the fused kernels (one call for the whole window) instead of stepping one
character at a time: a teacher-forced pass without gradient, in eval mode (no dropout, so the
global random stream is untouched), predicts every position of the window from the carried
state; a mask drawn with probability 1 - eps_i picks the inputs to replace, and input t + 1 becomes
a sample of the prediction made at position t (`--ss-mode model`) or a uniformly random symbol
(`--ss-mode uniform`, which needs no extra pass). The first input of a window is always the true
one. The training pass then runs on this mixture from the same carried state, and its loss is
against the true next characters, as always.

The state carried to the next window is the training (mixed) pass's: it is the state the
gradient flowed through and that the model really produced on what it was fed, so that, as in
generation, the context a window starts from was built partly on the model's own predictions;
with nothing replaced it is exactly plain training's state (the teacher-forced pass's state is
not used at all).

The mask and the samples come from a generator of their own, seeded afresh at every step from
(seed, rank, schedule step): nothing is drawn from the generator dropout uses, so with nothing
to replace (eps = 1, e.g. `--ss-floor 1`) the extra pass is skipped and training is bit for bit
plain training; a resumed run draws exactly the masks it would have drawn (the schedule's
position, `ss_step`, is in the checkpoint's training state); and every DDP rank draws its own.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.config import TrainConfig
from charlm.devices import autocast_for

# --ss-k when not given: the decays reach eps = 1/2 after 500, 693 and 461 steps.
DEFAULT_K = {"linear": 1000.0, "exponential": 0.999, "inverse-sigmoid": 100.0}


def teacher_forcing(cfg: TrainConfig, i: int) -> float:
    """eps_i: the probability that input i of the schedule's steps is the true character."""
    if cfg.scheduled_sampling == "none":
        return 1.0
    k = DEFAULT_K[cfg.scheduled_sampling] if cfg.ss_k is None else cfg.ss_k
    if cfg.scheduled_sampling == "linear":
        eps = 1.0 - i / k
    elif cfg.scheduled_sampling == "exponential":
        eps = k**i
    else:
        eps = k / (k + math.exp(min(i / k, 700.0)))  # exp(700) is near float's limit: eps is 0 by then anyway
    return max(cfg.ss_floor, eps)


class ScheduledSampler:
    """Mixes a window's inputs with the model's own predictions, as the schedule says for this step."""

    def __init__(self, cfg: TrainConfig, vocab_size: int, rank: int = 0):
        self.cfg, self.vocab_size, self.rank = cfg, vocab_size, rank
        self._generators: dict[str, torch.Generator] = {}

    def replace_probability(self, ss_step: int) -> float:
        return 1.0 - teacher_forcing(self.cfg, ss_step)

    def generator(self, device: torch.device, ss_step: int) -> torch.Generator:
        """This step's generator: seeded from (seed, rank, step), so resume and DDP need no saved state."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        digest = hashlib.blake2b(f"{self.cfg.seed}:{self.rank}:{ss_step}".encode(), digest_size=8).digest()
        return self._generators[key].manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))

    def inputs(self, model: torch.nn.Module, x: Tensor, state, ss_step: int) -> Tensor:
        """The window's inputs (B, T) for the training pass: x itself when nothing is to be replaced."""
        prob = self.replace_probability(ss_step)
        if prob <= 0.0:
            return x
        gen = self.generator(x.device, ss_step)
        replace = torch.rand(x.shape, generator=gen, device=x.device) < prob
        replace[:, 0] = False  # the first input of a window stays the true character
        if self.cfg.ss_mode == "uniform":
            guess = torch.randint(self.vocab_size, x.shape, generator=gen, device=x.device)
        else:
            guess = torch.empty_like(x)
            guess[:, 1:] = self.predictions(model, x, state, gen)[:, :-1]  # position t's prediction feeds input t + 1
            guess[:, 0] = x[:, 0]
        return torch.where(replace, guess, x)

    def predictions(self, model: torch.nn.Module, x: Tensor, state, gen: torch.Generator) -> Tensor:
        """The teacher-forced pass: a sample of the model's next-symbol distribution at every position (B, T)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast_for(x.device, self.cfg.dtype):
                logits, _ = model(x, state)
        finally:
            model.train(was_training)
        probs = F.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        return torch.multinomial(probs, 1, generator=gen).view(x.shape)
