"""A training run's progress record: where it is (step, epoch, window, tokens, time, best figure). Saved in
every checkpoint as its train_state (checkpoint/trainstate.py checks each field against this class)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # completed passes over the training split
    window: int = 0  # next window within the epoch
    tokens: int = 0  # training tokens consumed
    elapsed: float = 0.0  # seconds of training so far, across resumes
    best_val: float = math.inf  # lowest validation bits/char so far
    best_step: int = 0
    ss_step: int = 0  # scheduled sampling: steps taken under the schedule (its position; scheduled.py)
    ss_replace: float = 0.0  # scheduled sampling: the probability of feeding a prediction at the last step
