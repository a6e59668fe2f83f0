"""One generation step of a model, or of an ensemble, as a torch module that exports to ONNX.

    ids (B,), state tensors (L, B, H) per member and state name
        -> log-probs (B, V), the new state tensors

Each member's step is its cell's own equations (`layer_step`, the cell contract's reference and the
test oracle of charlm's fast decoders), so every registered cell exports without code of its own,
a new one included. charlm's packed decoders (tables, stacked matrices, int8 products) are not
reused: they are kernels for torch's eager mode; onnxruntime fuses and schedules the plain
equations itself. An ensemble's members are combined inside the graph by charlm's rule
(decoding/ensemble.py): the weighted mean of probabilities in log space, or the normalised
geometric mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from charlm.model import CharRNN

LOGPROBS = "logprobs"  # the graph's output of next-symbol log-probabilities (B, V)
IDS = "ids"  # the graph's input: the symbol each stream reads at this step (B,), int64


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor of the graph: its input and output names and its (L, B, H) shape without B."""

    input: str
    output: str
    member: int
    name: str  # the cell's state name: h, c
    layers: int
    size: int

    def record(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "member": self.member,
            "name": self.name,
            "layers": self.layers,
            "size": self.size,
        }


def state_specs(models: Sequence[CharRNN]) -> list[StateSpec]:
    """The graph's state tensors in input order: h, c for one model; m0_h, m0_c, m1_h ... for an ensemble."""
    specs = []
    for m, model in enumerate(models):
        prefix = f"m{m}_" if len(models) > 1 else ""
        for name in model.rnn.state_names:
            specs.append(StateSpec(prefix + name, prefix + name + "_out", m, name, model.rnn.num_layers, model.rnn.hidden_size))
    return specs


def log_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Normalised log-weights as charlm's Ensemble computes them (scaled by the largest first, so huge or tiny weights stay finite)."""
    weights = list(weights) if weights is not None else [1.0] * count
    top = max(weights)
    total = sum(w / top for w in weights)
    return [math.log(w) - math.log(top) - math.log(total) for w in weights]


class StepModule(nn.Module):
    """The exported function: one step of every member, combined. forward(ids, *states) -> (logprobs, *states)."""

    def __init__(self, models: Sequence[CharRNN], weights: Sequence[float] | None = None, combine: str = "mean"):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.counts = [len(m.rnn.state_names) for m in models]
        self.combine = combine
        logw = torch.tensor(log_weights(weights, len(models)))
        self.log_w: Tensor
        self.w: Tensor
        self.register_buffer("log_w", logw.view(-1, 1, 1), persistent=False)  # (M, 1, 1)
        self.register_buffer("w", logw.exp().view(-1, 1, 1), persistent=False)

    def forward(self, ids: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        logps, new_states, at = [], [], 0
        for model, n in zip(self.members, self.counts):
            logp, new = member_step(model, ids, states[at : at + n])  # type: ignore[arg-type]
            logps.append(logp)
            new_states += new
            at += n
        if len(logps) == 1:
            return (logps[0], *new_states)
        stacked = torch.stack(logps)  # (M, B, V)
        if self.combine == "mean":
            out = torch.logsumexp(stacked + self.log_w, dim=0)
        else:  # geometric: the weighted sum of log-probs, normalised again
            out = torch.log_softmax((stacked * self.w).sum(dim=0), dim=-1)
        return (out, *new_states)


def member_step(model: CharRNN, ids: Tensor, state: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One model's step from its cell's equations: ids (B,), its state tensors (L, B, H) -> log-probs (B, V), new state."""
    cell = model.rnn
    x = model.embed(ids)  # (B, E)
    layers = []
    for k in range(cell.num_layers):
        x, layer_state, _ = cell.layer_step(k, x, tuple(s[k] for s in state))  # (B, H)
        layers.append(layer_state)
    logits = model.head(x)  # (B, V)
    new = [torch.stack([layer[i] for layer in layers]) for i in range(len(state))]  # (L, B, H) each
    return torch.log_softmax(logits, dim=-1), new
