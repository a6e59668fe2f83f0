"""One pass of a text through a model: per-token internals, next-token predictions, per-character bits.

The text is scored as one stream with the state carried through (as `charlm eval` does). The
internals come from the cell contract. A cell with a fast `inspect` of its own (the fused cells:
lstm, gru, rnn) gives outputs and internals together, so the stream goes through it once, in
chunks. Otherwise the plain equations (`Cell.internals`) step in Python; to keep that affordable
the stream is cut into R rows of T tokens:

    tokens  0 ........ T-1 | T ....... 2T-1 | ... | (R-1)T ... N-1
            row 0          | row 1          |     | row R-1

The fast forward (fused kernels) runs the rows one after the other as windows of one stream and
records the state at each row's start; the equations then step all R rows side by side (a batch
of R), each from its recorded state: the same activations as one long unroll, R times fewer
Python steps.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from charlm import threads as cpu_threads
from charlm.cells import Cell
from charlm.errors import CharlmError

TOP = 5  # predictions kept per position


@dataclass
class Trace:
    """Everything the viewer needs from the model, for one text."""

    text: str  # the characters the tokens spell (what is shown)
    ids: np.ndarray  # (N,) token ids
    char_tok: np.ndarray  # (C,) index of the token that spells each character
    bits: np.ndarray  # (C,) bits each character cost (NaN for the first token's: no context)
    top_ids: np.ndarray  # (N, K) the most likely next tokens after each token
    top_p: np.ndarray  # (N, K) their probabilities
    acts: dict[str, Tensor]  # internal name -> (N, L, H) after each token
    gate_names: tuple[str, ...]
    identity: bool  # one token per character (char vocabularies)
    names: tuple[str, ...] = ()  # every internal the cell names (acts may hold only some)

    @property
    def num_layers(self) -> int:
        return next(iter(self.acts.values())).shape[1]

    @property
    def hidden_size(self) -> int:
        return next(iter(self.acts.values())).shape[2]

    def per_char(self, name: str) -> Tensor:
        """The activation `name` at every character (a piece's characters share its value): (C, L, H)."""
        a = self.acts[name]
        return a if self.identity else a[torch.from_numpy(self.char_tok)]

    def bits_per_char(self) -> float:
        """The text's bits per character: the scored characters' total over their count."""
        b = self.bits[~np.isnan(self.bits)]
        return float(b.sum() / len(b)) if len(b) else math.nan


def align(vocab, ids: np.ndarray) -> tuple[str, np.ndarray]:
    """The text the ids spell, and for each of its characters the token that completes it.

    A SentencePiece piece spells several characters; a byte piece (or a byte) spells none until the
    last byte of its character arrives, so a character belongs to the token that completes it.
    """
    decode = vocab.stream_decoder()
    pieces = [decode(int(i)) for i in ids]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    return "".join(pieces), np.repeat(np.arange(len(ids), dtype=np.int64), lengths)


def char_bits(tok_bits: np.ndarray, char_tok: np.ndarray, num_tokens: int) -> np.ndarray:
    """Spread each token's bits over the characters it completes (tokens that complete none pass theirs on)."""
    counts = np.bincount(char_tok, minlength=num_tokens)
    carried, owed = np.zeros(num_tokens), 0.0
    for t in range(num_tokens):  # bits of tokens spelling no character go to the next one that does
        owed += tok_bits[t]
        if counts[t]:
            carried[t], owed = owed / counts[t], 0.0
    return carried[char_tok]


@torch.inference_mode()
def run(
    model,
    vocab,
    text: str,
    unknown: str = "error",
    rows: int = 48,
    keep=None,
    stream: bool | None = None,
    threads: int | None = None,
) -> Trace:
    """Run `text` through `model` once, the state carried; see the module docstring for the layout.
    `keep`: the internals to keep (default all; the gates are always kept, for their saturation).
    `stream`: through the cell's own `inspect` in one pass (default where it has one) or in rows.
    `threads`: on CPU, this many threads (default: the free cores, charlm/threads.py)."""
    ids = np.asarray(vocab.encode(text, unknown), dtype=np.int64)
    if len(ids) == 0:
        raise CharlmError("the text has no character the model's vocabulary holds")
    shown, char_tok = align(vocab, ids)
    if len(shown) == 0:
        raise CharlmError("the text spells no whole character")
    device = model.head.weight.device
    n = len(ids)
    ids_t = torch.from_numpy(ids).to(device)
    keep = None if keep is None else set(keep) | set(model.rnn.gate_names)
    stream = has_own_inspect(model.rnn) if stream is None else stream
    with idle_core_threads(device, threads):
        if stream:
            logps, acts = _stream(model, ids_t, keep)
        else:
            rows = max(1, min(rows, n // 8 or 1))
            span = -(-n // rows)  # T: tokens per row
            rows = -(-n // span)
            starts, logps = _score(model, ids_t, span)
            acts = _internals(model, ids_t, starts, span, rows, keep)
    tok_bits = np.full(n, np.nan)
    tok_bits[1:] = (-logps[:-1].gather(1, ids_t[1:, None])[:, 0] / math.log(2)).cpu().double().numpy()
    top_p, top_ids = logps.topk(min(TOP, logps.shape[1]), dim=1)
    return Trace(
        text=shown,
        ids=ids,
        char_tok=char_tok,
        bits=char_bits(tok_bits, char_tok, n),
        top_ids=top_ids.cpu().numpy(),
        top_p=top_p.exp().cpu().numpy(),
        acts=acts,
        gate_names=tuple(g for g in model.rnn.gate_names if g in acts),
        identity=len(shown) == n and bool((char_tok == np.arange(n)).all()),
    )


def has_own_inspect(cell: Cell) -> bool:
    """Whether the cell inspects a window faster than the plain equations (and was not given its own `internals` only)."""
    return type(cell).inspect is not Cell.inspect and type(cell).internals is Cell.internals


def _stream(model, ids: Tensor, keep, chunk: int = 2048) -> tuple[Tensor, dict[str, Tensor]]:
    """The stream through the cell's own inspect, `chunk` tokens at a time (bounds the memory the
    internals take before only the kept ones are copied out): log-probs (N, V), name -> (N, L, H)."""
    state = model.init_state(1)
    logps, acts = [], {}
    for lo in range(0, len(ids), chunk):
        out, window, state = model.rnn.inspect(model.embed(ids[None, lo : lo + chunk]), state)
        logps.append(F.log_softmax(model.head(out)[0].float(), dim=-1))
        for name, a in window.items():  # (L, 1, T, H), copied straight into its place in (N, L, H)
            if keep is None or name in keep:
                if name not in acts:
                    acts[name] = torch.empty(len(ids), a.shape[0], a.shape[3])
                acts[name][lo : lo + a.shape[2]] = a[:, 0].transpose(0, 1)
    return torch.cat(logps), acts


def _score(model, ids: Tensor, span: int) -> tuple[list, Tensor]:
    """The fast forward over the stream, window by window: the state at each window's start, log-probs (N, V).

    On CPU this and the internals run on the idle cores only (see idle_core_threads).
    """
    state = model.init_state(1)
    starts, logps = [], []
    for lo in range(0, len(ids), span):
        starts.append(state)
        logits, state = model(ids[None, lo : lo + span], state)  # (1, T, V)
        logps.append(F.log_softmax(logits[0].float(), dim=-1))
    return starts, torch.cat(logps)


def idle_core_threads(device: torch.device, threads: int | None = None):
    """On CPU, the trace runs on the free cores only (charlm/threads.py; `threads` overrides). The
    trace is many small steps (a matrix-vector product per token of the stream), each a parallel
    region that waits for every thread: with a thread on a core that another job holds, every step
    waits for it to be scheduled. On the 2-core development machine with other jobs running, two
    threads made a 2x512 LSTM's trace several times slower (2,000 tokens of the stream: 0.5-0.7 s
    on one thread, 4.7-32 s on two); idle, two threads are 1.6x faster than one (20,000 characters:
    4.6 s against 7.4 s)."""
    return cpu_threads.use("batch", threads) if device.type == "cpu" else contextlib.nullcontext()


def _internals(model, ids: Tensor, starts: list, span: int, rows: int, keep) -> dict[str, Tensor]:
    """The cell's internals at every token, all rows stepped side by side: name -> (N, L, H)."""
    n = len(ids)
    padded = torch.zeros(rows * span, dtype=ids.dtype, device=ids.device)
    padded[:n] = ids  # the last row's tail is padding, dropped below
    x = model.embed(padded.view(rows, span))  # (R, T, E)
    state = tuple(torch.cat([s[i] for s in starts], dim=1) for i in range(len(starts[0])))  # (L, R, H) each
    if type(model.rnn).internals is not Cell.internals:  # a cell with its own inspection: ask it
        acts, _ = model.rnn.internals(x, state)  # name -> (L, R, T, H)
        return {
            name: a.permute(1, 2, 0, 3).reshape(rows * span, a.shape[0], a.shape[3])[:n].float().cpu().contiguous()
            for name, a in acts.items()
            if keep is None or name in keep
        }
    return _unroll(model.rnn, x, state, keep, n)


def _unroll(cell: Cell, x: Tensor, state: tuple, keep, n: int) -> dict[str, Tensor]:
    """Cell.internals's loop over layer_step, writing only the kept names, each straight into its
    (R, T, L, H) place (Cell.internals stacks every name at the end: here that was a fifth of the time)."""
    rows, span = x.shape[:2]
    layers = [tuple(s[k] for s in state) for k in range(cell.num_layers)]
    out: dict[str, Tensor] = {}
    for t in range(span):
        inp = x[:, t]
        for k in range(cell.num_layers):
            inp, layers[k], acts = cell.layer_step(k, inp, layers[k])
            for name, a in acts.items():
                if keep is not None and name not in keep:
                    continue
                if name not in out:
                    out[name] = torch.empty(rows, span, cell.num_layers, a.shape[-1], device=a.device)
                out[name][:, t, k] = a
    return {name: a.view(rows * span, cell.num_layers, -1)[:n].float().cpu() for name, a in out.items()}
