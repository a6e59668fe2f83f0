"""CharRNN: embedding -> LSTM/GRU/RNN stack -> linear head. Pure: no I/O, no loss, no sampling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from charlm.config import ModelConfig

State = tuple[Tensor, ...]  # LSTM: (h, c); GRU/RNN: (h,); each (num_layers, B, H)

RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharRNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_size)
        self.rnn = RNN_CLASSES[cfg.cell](
            cfg.embed_size,
            cfg.rnn_size,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.rnn_size, cfg.vocab_size)

    @property
    def is_lstm(self) -> bool:
        return self.cfg.cell == "lstm"

    def init_state(self, batch_size: int, device=None) -> State:
        """The zero state a stream starts from."""
        shape = (self.cfg.num_layers, batch_size, self.cfg.rnn_size)
        device = device or self.head.weight.device
        return tuple(torch.zeros(shape, device=device) for _ in range(2 if self.is_lstm else 1))

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) -> logits (B, T, V), and the state after the last step."""
        if state is None:
            state = self.init_state(ids.shape[0], ids.device)
        x = self.drop(self.embed(ids))  # (B, T, E)
        out, new = self.rnn(x, state if self.is_lstm else state[0])  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, (new if self.is_lstm else (new,))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach(state: State) -> State:
    """Cut the graph between windows: the values carry over, the gradients stop here."""
    return tuple(s.detach() for s in state)
