"""Ensembles of models whose character vocabularies differ: every member speaks the union vocabulary.

A member trained on Shakespeare knows no '{'; one trained on C code knows no 'Æ'. Over the union of
their vocabularies each member is wrapped as a UnionMember, a Scorer in union ids:

- its output puts the member's log-probs in the columns of its own symbols and -inf (probability
  zero) in the others, so under the mean rule a symbol a member never saw gets that member's share
  of probability zero and the others' shares unchanged;
- an input symbol the member never saw is skipped for that member, as `--unknown skip` skips it for
  a single model: its state and its prediction stay what they were before that symbol (a member
  cannot read what it has no embedding for). Before the member has read any symbol its prediction
  is uniform over its own vocabulary.

The geometric rule is refused for such ensembles: a weighted geometric mean is zero wherever one
member gives zero, so each member would veto every symbol the others add (on disjoint extras the
union would collapse to the shared symbols, or to nothing).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from charlm.decoding.scorer import Scorer
from charlm.errors import CharlmError, OptionError


def union_vocab(vocabs: list):
    """The union of several char (or byte) vocabularies, or a CharlmError naming why they cannot be joined."""
    from charlm.tokenizers.vocab import Vocab

    kinds = {v.kind for v in vocabs}
    if "spm" in kinds:
        spm = next(v for v in vocabs if v.kind == "spm")
        other = next((v for v in vocabs if v != spm), vocabs[0])
        raise CharlmError(
            f"the members use different tokenizers ({spm.describe()}; {other.describe()}): only character "
            "vocabularies can be joined; ensemble members with SentencePiece must share the same tokenizer "
            "(models trained on the same prepared data)"
        )
    if len(kinds) > 1:
        raise CharlmError("the members' vocabularies are of different kinds (characters and bytes): they cannot be joined")
    return Vocab(kinds.pop(), np.unique(np.concatenate([v.codes for v in vocabs])))


def check_combine(combine: str) -> None:
    if combine != "mean":
        raise OptionError(
            "--combine geometric needs members that share one vocabulary: a geometric mean is zero wherever "
            "one member gives zero, so each would veto the symbols only the others know; use --combine mean"
        )


class UnionMember:
    """One member of a union-vocabulary ensemble, behind the Scorer protocol in union ids (see the module docstring)."""

    def __init__(self, member: Scorer, union) -> None:
        self.member, self.vocab = member, union
        self.to_member = torch.from_numpy(member.vocab.lookup(union.codes))  # union id -> member id, -1 if it lacks it
        self.columns = torch.from_numpy(union.lookup(member.vocab.codes))  # member id -> union id
        self.own_size = len(member.vocab)

    def start(self, batch_size: int):
        uniform = torch.full((1, batch_size, self.own_size), -math.log(self.own_size))  # (1, B, V_m): batch on dim 1, as states
        return (self.member.start(batch_size), uniform)

    def reorder(self, state, index: Tensor):
        inner, last = state
        return (self.member.reorder(inner, index), last.index_select(1, index.to(last.device)))

    def _widen(self, logp: Tensor) -> Tensor:
        """Member log-probs (..., V_m) -> union log-probs (..., V_u), -inf where the member has no symbol."""
        out = torch.full((*logp.shape[:-1], len(self.vocab)), float("-inf"), device=logp.device)
        out[..., self.columns.to(logp.device)] = logp.float()
        return out

    def step(self, ids: Tensor, state):
        inner, last = state
        mids = self.to_member[ids.cpu()]  # (B,)
        known = mids >= 0
        logp, new = self.member.step(mids.clamp_min(0), inner)
        if not bool(known.all()):  # rows whose symbol the member never saw keep their state and prediction
            keep = (~known).to(logp.device)
            logp = torch.where(keep.unsqueeze(1), last[0].to(logp.device), logp)
            new = tuple(torch.where(keep.view(1, -1, 1), old, s) for old, s in zip(inner, new))
        return self._widen(logp), (new, logp.unsqueeze(0))

    def score(self, ids: Tensor, state):
        """ids (B, T) -> union log-probs (B, T, V_u). Rows must skip the same positions (true of every caller: one
        text, or copies of one prime); a member's unknown symbols are left out of what it reads."""
        inner, last = state
        mids = self.to_member[ids.cpu()]  # (B, T)
        known = mids[0] >= 0  # (T,)
        if not bool((mids >= 0).eq(known).all()):
            raise CharlmError("a union-vocabulary ensemble scores rows that skip the same symbols only")
        if bool(known.all()):
            logp, inner = self.member.score(mids, inner)
            return self._widen(logp), (inner, logp[:, -1].unsqueeze(0))
        seen = torch.cumsum(known.long(), 0) - 1  # (T,): the last known position's index among the known ones, -1 before any
        if bool(known.any()):
            logp_known, inner = self.member.score(mids[:, known], inner)  # (B, T_known, V_m)
            logp = logp_known[:, seen.clamp_min(0)]
        else:
            logp = last[0].unsqueeze(1).expand(-1, ids.shape[1], -1)
        before = (seen < 0).to(logp.device).view(1, -1, 1)
        logp = torch.where(before, last[0].unsqueeze(1).to(logp.device), logp)
        return self._widen(logp), (inner, logp[:, -1].unsqueeze(0))
