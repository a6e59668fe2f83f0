"""Several models behind the Scorer protocol: stepped on a common sequence, distributions averaged."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from charlm.decoding.options import COMBINE_RULES
from charlm.decoding.scorer import ModelScorer, Scorer
from charlm.decoding.union import UnionMember, check_combine, union_vocab
from charlm.errors import CharlmError


class Ensemble:
    """Members share one vocabulary (or, for character vocabularies, speak their union: union.py); each
    keeps its own recurrent state.

    combine='mean': the weighted mean of the members' probabilities, log(sum_i w_i p_i), computed
    as a logsumexp in log space. combine='geometric': the normalized weighted geometric mean,
    softmax(sum_i w_i log p_i).
    """

    def __init__(self, members: Sequence[Scorer], weights: Sequence[float] | None = None, combine: str = "mean"):
        if not members:
            raise CharlmError("an ensemble needs at least one model")
        if combine not in COMBINE_RULES:
            raise CharlmError(f"--combine must be one of {', '.join(COMBINE_RULES)} (got {combine!r})")
        first = members[0].vocab
        self.union = any(m.vocab != first for m in members[1:])
        if self.union:  # characters one member lacks: every member speaks the union vocabulary (union.py)
            for i, m in enumerate(members[1:], start=2):
                if "spm" in (first.kind, m.vocab.kind) and m.vocab != first:
                    raise CharlmError(f"model 1 and model {i} have different vocabularies: {vocab_difference(first, m.vocab)}")
            check_combine(combine)
            first = union_vocab([m.vocab for m in members])
            members = [UnionMember(m, first) for m in members]
        if weights is None:
            weights = [1.0] * len(members)
        if len(weights) != len(members):
            raise CharlmError(f"--weights has {len(weights)} value(s) for {len(members)} model(s); give one weight per model")
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise CharlmError(f"--weights must all be positive finite numbers (got {', '.join(map(str, weights))})")
        # Scaled by the largest first: a plain sum overflows for weights near 1e308. The logs are
        # taken of the weights themselves, so a weight of 1e-320 next to 1 stays finite (log 0 would not).
        top = max(weights)
        total = sum(w / top for w in weights)  # in [1, n]
        self.members = list(members)
        self.vocab = first
        self.combine = combine
        self.weights = [w / top / total for w in weights]
        self.log_weights = torch.tensor([math.log(w) - math.log(top) - math.log(total) for w in weights])
        self._stacked = None  # StackedModels, or False: built on the first step, if the members allow

    def start(self, batch_size: int):
        return tuple(m.start(batch_size) for m in self.members)

    def combine_logprobs(self, stacked: Tensor) -> Tensor:
        """The members' log-probs (M, ..., V) -> the ensemble's (..., V)."""
        shape = (-1,) + (1,) * (stacked.dim() - 1)
        if self.combine == "mean":
            return torch.logsumexp(stacked + self.log_weights.view(shape).to(stacked.device), dim=0)
        w = torch.tensor(self.weights).view(shape).to(stacked.device)
        return torch.log_softmax((stacked * w).sum(dim=0), dim=-1)

    def step(self, ids: Tensor, state):
        if self._stacked is None:
            self._stacked = ModelScorer.stacked(self.members) or False
        if self._stacked:  # the same numbers as stepping the members one by one, fewer operations
            logps, state = self._stacked.step(ids, state)
            return self.combine_logprobs(logps), state
        outs = [m.step(ids, s) for m, s in zip(self.members, state)]
        return self.combine_logprobs(torch.stack([o[0] for o in outs])), tuple(o[1] for o in outs)

    def score(self, ids: Tensor, state):
        outs = [m.score(ids, s) for m, s in zip(self.members, state)]
        return self.combine_logprobs(torch.stack([o[0] for o in outs])), tuple(o[1] for o in outs)

    def reorder(self, state, index: Tensor):
        return tuple(m.reorder(s, index) for m, s in zip(self.members, state))


def vocab_difference(a, b) -> str:
    """Name the symbols one vocabulary has and the other lacks; for SentencePiece, say which tokenizers differ."""
    if "spm" in (a.kind, b.kind):
        # Pieces are not comparable one by one: the same piece can have another id, or another
        # segmentation around it. Only the same serialized model makes the same token stream.
        return (
            f"the first uses {a.describe()}, the second {b.describe()}; ensemble members must share the same "
            "tokenizer (models trained on the same prepared data)"
        )
    sa = {a.symbol(i) for i in range(len(a))}
    sb = {b.symbol(i) for i in range(len(b))}
    parts = []
    if sa - sb:
        parts.append("only in the first: " + " ".join(repr(c) for c in sorted(sa - sb)[:20]))
    if sb - sa:
        parts.append("only in the second: " + " ".join(repr(c) for c in sorted(sb - sa)[:20]))
    if not parts:
        parts.append(f"same symbols, different kinds ({a.kind} vs {b.kind})")
    return "; ".join(parts)
