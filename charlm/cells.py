"""One-step recurrent cells for decoding, from a trained CharRNN's weights.

nn.LSTM dispatches to the oneDNN sequence kernel, which is fast for long windows but costs about
a millisecond per layer for a single step on CPU. Generation takes one step at a time, so it uses
plain matrix products instead, arranged so that each step launches as few operations as possible:

- layer 0's input product is precomputed for every vocabulary entry (embedding @ W_ih + biases),
  so a step gathers one row of a table instead of multiplying;
- in the layers above, input and recurrent weights are stacked into one matrix, so [x, h] takes
  one matrix product instead of two;
- LSTM gate columns are reordered to (i, f, o, g), so one sigmoid covers three gates and one tanh
  the fourth.

- on CPU, each matrix is packed once into oneDNN's blocked layout and multiplied by oneDNN's
  linear kernel: for the few rows of a decoding step (1 stream, a beam of 10) torch.mm (MKL) runs
  far below this CPU's rate; measured for 1024x2048 fp32, 1 row 177 -> 90 us, 10 rows 1,031 -> 143 us.
  Without oneDNN (CUDA, other builds) plain matrix products are used.

dtype='bf16' stores the matrices in bf16 and multiplies in bf16 (the state, the gates and the
output stay fp32): half the weight bytes per step, and several times faster for a batch of
streams (a beam, --num-samples) on CPUs with bf16 matrix units. dtype='int8' stores them as int8
with a scale per row (Int8Product): a quarter of the bytes, for single streams and ensembles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.model import CharRNN, State


def _lstm_gate_order(w: Tensor, hidden: int) -> Tensor:
    """PyTorch's (i, f, g, o) gate blocks along dim 0 -> (i, f, o, g)."""
    i, f, g, o = w.split(hidden, dim=0)
    return torch.cat([i, f, o, g], dim=0)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Product:
    """x (B, in) -> x @ W.T (B, out) for a fixed W (out, in), in the given dtype, packed once.

    The packed oneDNN weight is tried with one probe call; any failure falls back to torch.mm.
    """

    def __init__(self, w: Tensor, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        w = w.detach().to(dtype).contiguous()
        self.packed = None
        if w.device.type == "cpu" and _onednn_available():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                torch.ops.mkldnn._linear_pointwise(torch.zeros(1, w.shape[1], dtype=dtype), packed, None, "none", [], "")
                self.packed = packed
            except (RuntimeError, NotImplementedError):
                pass
        self.wt = w.t().contiguous() if self.packed is None else None

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return torch.mm(x, self.wt)


class Int8Product:
    """x (B, in) -> x @ W.T (B, out), W stored as int8 with one scale per output row (weight-only).

    For a single stream a step reads every weight once, and that reading is the cost: int8 reads a
    quarter of fp32's bytes and half of bf16's. It matters most for ensembles, whose members'
    weights together outgrow the caches one model fits in. Activations are bf16; the weights are
    rounded to 255 levels per row (relative error of a product about 1%, the figures differ more
    from fp32 than bf16's do). Where the int8 kernel is missing, the dequantized weights are
    multiplied in bf16: the same numbers, without the speed.
    """

    def __init__(self, w: Tensor):
        w = w.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # one per output row
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.fallback = None
        try:
            # PyTorch 2.13's CPU kernel crashes (it does not raise) unless `in` is a multiple of 16.
            if w.device.type != "cpu" or w.shape[1] % 16:
                raise NotImplementedError
            torch.ops.aten._weight_int8pack_mm(torch.zeros(1, w.shape[1], dtype=torch.bfloat16), self.q, self.scale)
        except (RuntimeError, NotImplementedError, AttributeError):
            self.fallback = Product(self.q.float() * self.scale.float()[:, None], torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        if self.fallback is not None:
            return self.fallback(x)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)


def product(w: Tensor, dtype: str) -> Product | Int8Product:
    """The decoding product for a weight matrix (out, in) in a decoding dtype: fp32, bf16 or int8."""
    if dtype == "int8":
        return Int8Product(w)
    return Product(w, torch.bfloat16 if dtype == "bf16" else torch.float32)


def _lstm_update(gates: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor, hidden: int) -> Tensor:
    """The LSTM cell after its products: gates (..., 4H) in (i, f, o, g) order, activated in place;
    the new cell state written into c_out and the new h into h_out, which is returned."""
    H = hidden
    sig = gates[..., : 3 * H].sigmoid_()
    g = gates[..., 3 * H :].tanh_()
    i, f, o = sig[..., :H], sig[..., H : 2 * H], sig[..., 2 * H :]
    c = torch.addcmul(f * c_prev, i, g, out=c_out)
    return torch.mul(o, torch.tanh(c), out=h_out)


class Stepper:
    """Single-step forward of a CharRNN: ids (B,) and state -> logits (B, V) and state."""

    @torch.no_grad()
    def __init__(self, model: CharRNN, dtype: str = "fp32"):
        cfg = model.cfg
        mat = lambda w: product(w, dtype)  # w: (out, in)
        self.cell, self.layers, H = cfg.cell, cfg.num_layers, cfg.rnn_size
        self.hidden = H
        rnn = model.rnn
        order = (lambda w: _lstm_gate_order(w, H)) if self.cell == "lstm" else (lambda w: w.detach().clone())
        w_ih = [order(getattr(rnn, f"weight_ih_l{k}")) for k in range(self.layers)]  # (G*H, in)
        w_hh = [order(getattr(rnn, f"weight_hh_l{k}")) for k in range(self.layers)]  # (G*H, H)
        b_ih = [order(getattr(rnn, f"bias_ih_l{k}")) for k in range(self.layers)]
        b_hh = [order(getattr(rnn, f"bias_hh_l{k}")) for k in range(self.layers)]
        if self.cell == "gru":
            # GRU keeps the recurrent product apart: its n gate is tanh(W_in x + b_in + r * (W_hn h + b_hn)).
            self.table0 = model.embed.weight @ w_ih[0].t() + b_ih[0]  # (V, 3H)
            self.w_ih = [None] + [mat(w) for w in w_ih[1:]]  # layer 0's input product is table0
            self.b_ih = b_ih
            self.w_hh = [mat(w) for w in w_hh]
            self.b_hh = b_hh
        else:
            self.table0 = model.embed.weight @ w_ih[0].t() + b_ih[0] + b_hh[0]  # (V, G*H)
            self.w_hh0 = mat(w_hh[0])  # h (B, H) -> (B, G*H)
            # Layers above: one (G*H, in + H) matrix for the stacked [x, h].
            self.w_cat = [None] + [mat(torch.cat([w_ih[k], w_hh[k]], dim=1)) for k in range(1, self.layers)]
            self.b = [None] + [b_ih[k] + b_hh[k] for k in range(1, self.layers)]
        self.w_head = mat(model.head.weight)  # (B, H) -> (B, V)
        self.b_head = model.head.bias.clone()

    @staticmethod
    def _affine(bias: Tensor, x: Tensor, w: Product) -> Tensor:
        """bias + x @ W.T in fp32, the product in w's dtype."""
        return w(x).float().add_(bias)

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        if self.cell == "gru":
            return self._gru(ids, state)
        lstm = self.cell == "lstm"
        h_all = torch.empty_like(state[0])  # (L, B, H): the new state, written layer by layer
        c_all = torch.empty_like(state[1]) if lstm else None
        x = None
        for k in range(self.layers):
            h = state[0][k]
            if k == 0:
                gates = self._affine(self.table0[ids], h, self.w_hh0)  # (B, G*H)
            else:
                gates = self._affine(self.b[k], torch.cat([x, h], dim=1), self.w_cat[k])
            if lstm:
                x = _lstm_update(gates, state[1][k], c_all[k], h_all[k], self.hidden)
            else:
                x = torch.tanh(gates, out=h_all[k])
        logits = self._affine(self.b_head, x, self.w_head)  # (B, V)
        return logits, ((h_all, c_all) if lstm else (h_all,))

    def _gru(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        h_all = torch.empty_like(state[0])
        x = None
        for k in range(self.layers):
            h = state[0][k]
            gi = self.table0[ids] if k == 0 else self._affine(self.b_ih[k], x, self.w_ih[k])  # (B, 3H)
            gh = self._affine(self.b_hh[k], h, self.w_hh[k])
            ir, iz, in_ = gi.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            x = torch.add(n, z * (h - n), out=h_all[k])
        logits = self._affine(self.b_head, x, self.w_head)
        return logits, (h_all,)


class StackedStepper:
    """One step of several LSTM Steppers of the same shape at once (an ensemble's members).

    The members' products stay separate (each has its own weights), but every pointwise operation
    (gate nonlinearities, the cell update, the table gather) runs once over all members, stacked
    along a leading member axis, instead of once per member. The state is the members' states
    stacked: (M, L, B, H) for h and c. Logits come out as (M, B, V).
    """

    def __init__(self, steppers: list[Stepper]):
        first = steppers[0]
        assert all(s.cell == "lstm" and s.layers == first.layers and s.hidden == first.hidden for s in steppers)
        self.layers, self.hidden = first.layers, first.hidden
        self.table0 = torch.stack([s.table0 for s in steppers])  # (M, V, 4H)
        self.w_hh0 = [s.w_hh0 for s in steppers]
        self.w_cat = [None] + [[s.w_cat[k] for s in steppers] for k in range(1, self.layers)]
        self.b = [None] + [torch.stack([s.b[k] for s in steppers]).unsqueeze(1) for k in range(1, self.layers)]
        self.w_head = [s.w_head for s in steppers]
        self.b_head = torch.stack([s.b_head for s in steppers]).unsqueeze(1)  # (M, 1, V)

    @staticmethod
    def _add_products(into: Tensor, products: list, inputs: Tensor) -> Tensor:
        """into[m] += inputs[m] @ W_m.T for each member m, in place; returns into."""
        for m, w in enumerate(products):
            into[m].add_(w(inputs[m]))
        return into

    def __call__(self, ids: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids (B,), h and c (M, L, B, H) -> logits (M, B, V), new h and c (M, L, B, H)."""
        H = self.hidden
        h_all, c_all = torch.empty_like(h), torch.empty_like(c)
        x = None
        for k in range(self.layers):
            if k == 0:
                gates = self._add_products(self.table0[:, ids], self.w_hh0, h[:, 0])  # (M, B, 4H)
            else:
                stacked_in = torch.cat([x, h[:, k]], dim=2)  # (M, B, 2H)
                gates = self._add_products(self.b[k].expand(-1, ids.shape[0], -1).clone(), self.w_cat[k], stacked_in)
            x = _lstm_update(gates, c[:, k], c_all[:, k], h_all[:, k], H)
        logits = self._add_products(self.b_head.expand(-1, ids.shape[0], -1).clone(), self.w_head, x)
        return logits, h_all, c_all
