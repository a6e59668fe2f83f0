"""The cell contract, written down once, and the registry of cells by name.

A recurrent cell is one class in charlm/cells/NAME.py, registered with @register, that owns
everything about itself. What the rest of charlm uses, and nothing else:

- `name` (the --cell value and what checkpoints record), `state_names` (LSTM: ("h", "c"); GRU:
  ("h",)), `gate_names` (which internals are gates, for saturation statistics);
- `zero_state(B)`: a tuple with one (num_layers, B, H) tensor per state name;
- `forward(x (B, T, E), state) -> (out (B, T, H), state)`: training and whole-window scoring, the
  whole stack of layers (dropout between them while training); it may call a fused kernel
  (oneDNN on CPU, cuDNN on CUDA) or a parallel scan;
- `layer_step(k, x (B, in), layer_state) -> (h (B, H), layer_state, activations)`: layer k's
  equations for one time step, written plainly. This is the reference: the test oracle for every
  fast path, the source of `internals` (named per-step activations for inspection), and, for a
  cell that writes nothing else, its forward pass and its decoder too;
- `decoder(cells, embeddings, dtype)` (a classmethod): the single-step decoding kernel for M
  members of this class and shape at once (one model is M = 1; an ensemble steps its members
  together): ids (B,) and a state whose tensors are (M, L, B, H) -> top-layer outputs (M, B, H)
  and the new state. Fast cells build it from packed products (cells/products.py: fp32, bf16,
  int8); the default steps `layer_step`;
- optionally `native_spec(embedding)`: the model's weights in the form the native single-step
  library takes (cells/native.py: a few rows at a time, the whole step in one C call). Only the
  built-in cells have one (the library holds their equations); any other cell steps through its
  decoder.

Any cell fits: one whose gates read the cell state (peephole.py) says so in its layer_step; one
without a recurrent matrix whose window comes from a scan (mingru.py, minlstm.py) overrides forward.
An LSTM-family cell names its forget gate's block of the bias (`forget_block`) for --forget-bias.
New cells are tested by the suite the moment they are registered (tests run over the registry).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from charlm.errors import CharlmError

State = tuple[Tensor, ...]  # one (num_layers, B, H) tensor per state name

_REGISTRY: dict[str, type[Cell]] = {}


def register(cls: type[Cell]) -> type[Cell]:
    """Class decorator: make a cell available by its `name` (--cell NAME, checkpoints, info)."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"a cell needs a name that is an identifier (got {cls.name!r})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a cell (tests register toy cells and take them away again)."""
    _REGISTRY.pop(name, None)


def cell_names() -> tuple[str, ...]:
    """The registered cells' names, in registration order."""
    return tuple(_REGISTRY)


def cell_class(name: str) -> type[Cell]:
    """The cell registered as `name`, or a CharlmError listing the registered ones."""
    if name not in _REGISTRY:
        raise CharlmError(f"cell must be one of {', '.join(_REGISTRY)} (got {name!r})")
    return _REGISTRY[name]


class Cell(nn.Module):
    """A stack of `num_layers` recurrent layers of `hidden_size` units; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    state_names: ClassVar[tuple[str, ...]] = ("h",)
    gate_names: ClassVar[tuple[str, ...]] = ()
    forget_block: ClassVar[int | None] = None  # LSTM family: which H-wide block of a layer's bias is the forget gate's

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout

    def layer_input_size(self, k: int) -> int:
        """Width of layer k's input: the embedding for layer 0, the layer below's output above it."""
        return self.input_size if k == 0 else self.hidden_size

    def zero_state(self, batch_size: int, device=None) -> State:
        """The state a stream starts from: zeros, (num_layers, B, H) per state name."""
        device = device or next(self.parameters()).device
        shape = (self.num_layers, batch_size, self.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.state_names)

    @torch.no_grad()
    def init_forget_bias(self, value: float) -> None:
        """Start every layer's forget-gate bias at `value` (--forget-bias; char-rnn and Jozefowicz et
        al. 2015 use 1): the first bias tensor's forget block is set to it, any second one's (nn.LSTM
        has b_ih and b_hh) to 0. Cells without a forget gate have nothing to set."""
        if self.forget_block is None:
            return
        H, lo = self.hidden_size, self.forget_block * self.hidden_size
        for k in range(self.num_layers):
            names = [n for n in (f"bias_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}") if hasattr(self, n)]
            for j, name in enumerate(names):
                getattr(self, name)[lo : lo + H].fill_(value if j == 0 else 0.0)

    def layer_step(self, k: int, x: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        """Layer k, one time step, from the equations: x (B, in), this layer's state (each (B, H))
        -> output (B, H), the new layer state, named activations (each (B, H))."""
        raise NotImplementedError(f"cell {self.name!r} must define layer_step")

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """x (B, T, E) -> out (B, T, H), state after the last step. Default: the equations, step by step."""
        out, state, _ = self._unroll(x, state, collect=False)
        return out, state

    @torch.no_grad()
    def internals(self, x: Tensor, state: State) -> tuple[dict[str, Tensor], State]:
        """Named per-step activations over a window: each (num_layers, B, T, H); and the state after it."""
        _, acts, state = self.inspect(x, state)
        return acts, state

    @torch.no_grad()
    def inspect(self, x: Tensor, state: State) -> tuple[Tensor, dict[str, Tensor], State]:
        """forward and internals in one pass: out (B, T, H), the named activations (each (num_layers,
        B, T, H)) and the state after the window. Here from the equations, a Python step per time
        step; a cell with a faster way that gives the same numbers overrides it (fused.py)."""
        out, state, acts = self._unroll(x, state, collect=True)
        return out, acts, state

    def _unroll(self, x: Tensor, state: State, collect: bool) -> tuple[Tensor, State, dict[str, Tensor]]:
        layers = [tuple(s[k] for s in state) for k in range(self.num_layers)]  # per layer: its (B, H) tensors
        outputs, trace = [], []
        for t in range(x.shape[1]):
            inp, step_acts = x[:, t], []
            for k in range(self.num_layers):
                if k > 0 and self.dropout and self.training and not collect:
                    inp = F.dropout(inp, self.dropout, training=True)
                inp, layers[k], acts = self.layer_step(k, inp, layers[k])
                step_acts.append(acts)
            outputs.append(inp)
            if collect:
                trace.append(step_acts)
        new_state = tuple(torch.stack([layers[k][i] for k in range(self.num_layers)]) for i in range(len(self.state_names)))
        acts = {}
        if collect and trace:  # name -> (L, B, T, H)
            acts = {
                name: torch.stack(
                    [torch.stack([trace[t][k][name] for t in range(len(trace))], dim=1) for k in range(self.num_layers)]
                )
                for name in trace[0][0]
            }
        return torch.stack(outputs, dim=1), new_state, acts

    @classmethod
    def decoder(cls, cells: list[Cell], embeddings: list[Tensor], dtype: str = "fp32"):
        """The single-step kernel for M members of this class and shape (see the module docstring)."""
        return EquationDecoder(cells, embeddings)

    def shape_key(self) -> tuple:
        """Members with equal keys can be stepped together by one decoder."""
        return (type(self), self.input_size, self.hidden_size, self.num_layers)


class EquationDecoder:
    """Single steps straight from layer_step, member by member, in fp32: for cells without a decoder of their own."""

    def __init__(self, cells: list[Cell], embeddings: list[Tensor]):
        self.cells = cells
        self.embeddings = [e.detach() for e in embeddings]

    @torch.no_grad()
    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        new = tuple(torch.empty_like(s) for s in state)  # (M, L, B, H) each
        outs = []
        for m, cell in enumerate(self.cells):
            x = self.embeddings[m][ids]  # (B, E)
            for k in range(cell.num_layers):
                x, layer, _ = cell.layer_step(k, x, tuple(s[m, k] for s in state))
                for i, s in enumerate(layer):
                    new[i][m, k] = s
            outs.append(x)
        return torch.stack(outs), new  # (M, B, H)
