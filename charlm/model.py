"""CharRNN: embedding -> a stack of recurrent cells -> linear head. Pure: no I/O, no loss, no sampling."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from charlm.cells import State, cell_class

if TYPE_CHECKING:  # for the annotations only: config imports this module (num_parameters), so the arrow goes config -> model
    from charlm.config import ModelConfig


class CharRNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_size)
        self.rnn = cell_class(cfg.cell)(cfg.embed_size, cfg.rnn_size, cfg.num_layers, cfg.dropout)  # charlm/cells/
        self.rnn.init_forget_bias(cfg.forget_bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.rnn_size, cfg.vocab_size)

    def init_state(self, batch_size: int, device=None) -> State:
        """The zero state a stream starts from: one (num_layers, B, H) tensor per state name of the cell."""
        return self.rnn.zero_state(batch_size, device or self.head.weight.device)

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) -> logits (B, T, V), and the state after the last step."""
        if state is None:
            state = self.init_state(ids.shape[0], ids.device)
        x = self.drop(self.embed(ids))  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in model.parameters() order, for any registered cell: the
    model is built on the meta device, so nothing is allocated whatever the sizes. Its random
    initialisation is skipped (shapes need no values): on the meta device the first `normal_`
    (nn.Embedding's) loads torch's Python reference kernels, 2 s of every checkpoint load here."""
    with torch.device("meta"), warnings.catch_warnings(), _SkipNormalInit():
        warnings.simplefilter("ignore")  # a zero size (refused by the caller) warns, and the warning would be a second line
        model = CharRNN(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


class _SkipNormalInit(TorchFunctionMode):
    """Inside it, `tensor.normal_(...)` leaves the tensor as it is (a mode is per thread, unlike patching the method)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.normal_, nn.init.normal_):  # nn.init's is seen first and would hide the method
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def detach(state: State) -> State:
    """Cut the graph between windows: the values carry over, the gradients stop here."""
    return tuple(s.detach() for s in state)
