"""Many generation streams stepped together: streams join and leave at any step (continuous batching).

A recurrent model's whole context is its state, a few (num_layers, 1, H) rows per stream, so a
stream joins the batch by concatenating its rows and leaves by dropping them: no cache to page.
Each stream keeps its own prime, sampling settings, random generator, stop strings and length, so
its text depends on its own request and seed only, never on which other streams run beside it:

    streams = Streams(scorer)
    a = streams.add("ROMEO:", length=100, temperature=0.8, seed=1)
    b = streams.add("JULIET:", length=50, greedy=True)
    while streams.active:
        for event in streams.step():      # one batched model step for every active stream
            print(event.stream, event.text, event.finished)

A prime is run through the whole-window forward pass in chunks of `prime_chunk` tokens, one chunk
per stream per step() before the batched step, so a long prime delays the others by one chunk's
forward pass per step, not by the whole prime. With background_primes=True (the server's choice) the
primes run instead on a thread of their own, one torch thread, while the batch goes on stepping: a
prime at batch 1-16 costs as much per symbol as a one-row step, so at 64 busy streams the new prompts
would otherwise take a large share of the time. The calls are the same either way, so is the text.
"""

from __future__ import annotations

import itertools
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from charlm.decoding.options import check_unknown
from charlm.decoding.sampling import draw, draw_one, processors, temperature_only
from charlm.decoding.scorer import PRIME_CHUNK, Scorer
from charlm.errors import DataError, OptionError

MAX_SEED = 2**63 - 1
MAX_LENGTH = 1 << 40  # far above any text, far below what an int64 counter holds


def random_seed() -> int:
    """A seed from the operating system, for a stream given none."""
    return int.from_bytes(os.urandom(8), "little") & MAX_SEED


@dataclass(frozen=True)
class SamplingSettings:
    """How one stream picks its next symbol: greedy, or temperature -> top-k -> top-p -> draw."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def chain(self) -> list:
        """The processors, validated (a bad value is an OptionError naming the option)."""
        return processors(self.temperature, self.top_k, self.top_p)


@dataclass
class Event:
    """What one step produced for one stream: new text (possibly empty, while a character's bytes or
    a possible stop string are held back), and whether the stream has ended and why."""

    stream: int  # the id add() returned
    text: str
    finished: bool = False
    reason: str | None = None  # "length" (its length reached) or "stop" (a stop string produced); None while running
    symbols: int = 0  # symbols generated so far by this stream


@dataclass(eq=False)  # compared by identity: membership tests never look at the arrays
class _Stream:
    """One stream's own request and progress (the batched state holds its recurrent rows)."""

    id: int
    settings: SamplingSettings
    chain: list
    rng: random.Random
    length: int
    stops: tuple[str, ...]
    decode: Callable[[int], str]
    prime: np.ndarray  # the ids still to run through the network before the stream can join
    draw_t: float | None = None  # the temperature, when it is the chain's only effect: one native call picks the symbol
    state: tuple | None = None  # its own state while its prime runs
    generated: int = 0
    held: str = ""  # text not emitted yet: it might be the start of a stop string
    ids: list[int] = field(default_factory=list)


def concat_states(states: Sequence) -> tuple:
    """Join the states of several batches (nested tuples of (L, B, H) tensors) along the stream dimension."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(list(states), dim=1)  # type: ignore[return-value]
    return tuple(concat_states([s[i] for s in states]) for i in range(len(first)))


class Streams:
    """Generation streams over one Scorer (a model or an ensemble), advanced one symbol per step, together."""

    def __init__(self, scorer: Scorer, prime_chunk: int = PRIME_CHUNK, background_primes: bool = False):
        self.scorer = scorer
        self.vocab = scorer.vocab
        self.prime_chunk = prime_chunk
        self._ids = itertools.count()
        self._pending: list[_Stream] = []  # priming, not yet in the batch
        self._rows: list[_Stream] = []  # in the batch, in row order
        self._state: tuple | None = None  # the batch's state, rows in self._rows order
        self._logp: Tensor | None = None  # (B, V): each row's next-symbol log-probs
        self._groups: list[list[int]] | None = None  # rows by sampling settings; None: to be worked out again
        # background_primes: the primes run on a thread of their own (one torch thread) while the batch steps,
        # so a server's new prompts cost its running streams nothing where a core is free.
        self._primer = ThreadPoolExecutor(1, "charlm-prime", torch.set_num_threads, (1,)) if background_primes else None
        self._priming: Future | None = None  # the primes running on that thread now

    def close(self) -> None:
        """End the priming thread (with background_primes: a prime running there finishes first); every
        stream is dropped."""
        if self._primer is not None:
            self._primer.shutdown(wait=True, cancel_futures=True)
        self._pending, self._priming = [], None
        self._keep([])

    # -- adding and removing -------------------------------------------------------------------
    def add(
        self,
        prime: str | Sequence[int] = "",
        length: int = 500,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
    ) -> int:
        """Queue a stream; it joins the batch once its prime has run (over the next step() calls). Returns its id.

        prime: text (or ids); with none, the stream starts as if after a line break. length: symbols to
        generate. stop: a string or strings that end the stream when produced (not included in its text).
        """
        settings = SamplingSettings(temperature, top_k, top_p, greedy)
        chain = [] if greedy else settings.chain()
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= MAX_LENGTH:
            raise OptionError(f"--length must be a whole number between 0 and {MAX_LENGTH} (got {length!r})")
        if seed is None:
            seed = random_seed()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
            raise OptionError(f"--seed must be between 0 and 2^63-1 (got {seed!r})")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise OptionError("stop must be a non-empty string or a list of non-empty strings")
        ids = prime_ids(self.vocab, prime, unknown) if isinstance(prime, str) else np.asarray(prime, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= len(self.vocab):
            raise OptionError(f"prime ids must be a non-empty list of ids below {len(self.vocab)}")
        stream = _Stream(
            next(self._ids),
            settings,
            chain,
            random.Random(int(seed)),
            int(length),
            stops,
            self.vocab.stream_decoder(),
            ids,
            temperature_only(chain, len(self.vocab)),
        )
        self._pending.append(stream)
        return stream.id

    def remove(self, stream_id: int) -> bool:
        """Drop a stream at once (a client went away); False if it is not here."""
        for i, s in enumerate(self._pending):
            if s.id == stream_id:
                del self._pending[i]
                return True
        for i, s in enumerate(self._rows):
            if s.id == stream_id:
                self._keep([j for j in range(len(self._rows)) if j != i])
                return True
        return False

    @property
    def active(self) -> int:
        """Streams not finished: in the batch or still priming."""
        return len(self._rows) + len(self._pending)

    @property
    def batch_size(self) -> int:
        """Streams in the batch (stepped together)."""
        return len(self._rows)

    def __len__(self) -> int:
        return self.active

    # -- stepping ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Run one chunk of each pending prime, then one symbol for every stream in the batch.

        Returns an Event per stream that produced a symbol (or finished); finished streams have left.
        """
        self._advance_primes()
        if not self._rows:
            return []
        assert self._logp is not None
        symbols = self._choose(self._logp)  # one per row
        events, keep = [], []
        for row, (stream, symbol) in enumerate(zip(self._rows, symbols)):
            event = self._emit(stream, symbol)
            events.append(event)
            if not event.finished:
                keep.append(row)
        if len(keep) < len(self._rows):
            symbols = [symbols[r] for r in keep]
            self._keep(keep)
        if self._rows:
            assert self._state is not None
            self._logp, self._state = self.scorer.step(torch.from_numpy(np.array(symbols, dtype=np.int64)), self._state)
        return events

    def run(self) -> Iterator[Event]:
        """Step until every stream has finished, yielding the events."""
        while self.active:
            yield from self.step()

    def _advance_primes(self) -> None:
        """One chunk of every pending prime (or, in the background, collect the primes finished and start the
        next); a prime that is done joins the batch."""
        if self._primer is None:
            self._join(self._prime_round(self._pending))
            return
        if self._priming is not None:
            future = self._priming
            if self._rows and not future.done():
                return  # the batch goes on stepping while the priming thread works
            self._priming = None
            self._join(future.result())  # a prime's failure is the step's (the caller's error handling)
        if self._pending:  # the streams added since: the next group (every pending stream is in it)
            self._priming = self._primer.submit(self._prime_fully, list(self._pending))
            if not self._rows:
                self._advance_primes()  # nothing to step meanwhile: wait for it

    def _prime_fully(self, group: list[_Stream]) -> list[tuple[_Stream, Tensor]]:
        """On the priming thread: every prime of the group to its end, a chunk at a time (the same calls, so
        the same state, as one chunk per step)."""
        done: list[tuple[_Stream, Tensor]] = []
        with torch.inference_mode():
            while group:
                done += self._prime_round(group)
                group = [s for s in group if len(s.prime)]
        return done

    def _prime_round(self, pending: list[_Stream]) -> list[tuple[_Stream, Tensor]]:
        """One chunk of each prime, together: those with a whole chunk left advance by a chunk in one call, the
        others by the shortest remainder among them in another. Returns the streams whose prime is done, each
        with its next-symbol log-probs (1, V)."""
        done = []
        full = [s for s in pending if len(s.prime) >= self.prime_chunk]
        rest = [s for s in pending if len(s.prime) < self.prime_chunk]
        for group in (full, rest):
            if not group:
                continue
            take = min(self.prime_chunk, min(len(s.prime) for s in group))
            ids = torch.from_numpy(np.stack([s.prime[:take] for s in group]))  # (P, take)
            state = concat_states([s.state if s.state is not None else self.scorer.start(1) for s in group])
            logp, state = self.scorer.score(ids, state)
            for i, stream in enumerate(group):
                stream.prime = stream.prime[take:]
                stream.state = self.scorer.reorder(state, torch.tensor([i])) if len(group) > 1 else state
                if len(stream.prime) == 0:
                    done.append((stream, logp[i : i + 1, -1]))
        return done

    def _join(self, primed: list[tuple[_Stream, Tensor]]) -> None:
        """Primed streams join the batch (those removed meanwhile, and those with nothing to generate, do not)."""
        joined = []
        for stream, logp in primed:
            if stream not in self._pending:
                continue  # removed while its prime ran on the priming thread
            self._pending.remove(stream)
            if stream.length > 0:  # with nothing to generate it ends without joining (run() sees it gone)
                joined.append((stream, logp))
        if joined:
            streams = [s for s, _ in joined]
            states = ([self._state] if self._rows else []) + [s.state for s in streams]
            logps = ([self._logp] if self._rows else []) + [lp for _, lp in joined]
            self._state = concat_states(states)
            self._logp = torch.cat(logps, dim=0)  # type: ignore[arg-type]
            for s in streams:
                s.state = None
            self._rows += streams
            self._groups = None

    def _choose(self, logp: Tensor) -> list[int]:
        """Each row's next symbol under its own settings: rows that share settings are processed together."""
        if self._groups is None:  # worked out when the rows change, not every step
            groups: dict[SamplingSettings, list[int]] = {}
            for row, stream in enumerate(self._rows):
                groups.setdefault(stream.settings, []).append(row)
            self._groups = list(groups.values())
        if len(self._groups) == 1:
            return self._choose_group(logp, self._rows)
        out = [0] * len(self._rows)
        for rows in self._groups:
            index = torch.tensor(rows, dtype=torch.long)
            picked = self._choose_group(logp.index_select(0, index.to(logp.device)), [self._rows[r] for r in rows])
            for r, symbol in zip(rows, picked):
                out[r] = symbol
        return out

    @staticmethod
    def _choose_group(logp: Tensor, streams: list[_Stream]) -> list[int]:
        first = streams[0]
        if first.settings.greedy:
            return logp.argmax(dim=-1).tolist()
        if len(streams) == 1 and first.draw_t is not None:  # one row, temperature only: one call (sampling.draw_one)
            return [draw_one(logp[0], first.draw_t, first.rng.random())]
        logits = logp
        for proc in first.chain:
            logits = proc(logits)
        uniforms = torch.tensor([s.rng.random() for s in streams], dtype=torch.float64)
        return draw(logits, uniforms).tolist()

    def _emit(self, stream: _Stream, symbol: int) -> Event:
        stream.generated += 1
        stream.ids.append(symbol)
        text = stream.held + stream.decode(symbol)
        if stream.stops:
            for stop in stream.stops:
                at = text.find(stop)
                if at >= 0:
                    return Event(stream.id, text[:at], True, "stop", stream.generated)
            # Hold back the longest end of the text that could still become a stop string.
            hold = max(
                (k for stop in stream.stops for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])),
                default=0,
            )
            text, stream.held = (text[:-hold], text[-hold:]) if hold else (text, "")
        if stream.generated >= stream.length:
            return Event(stream.id, text + stream.held, True, "length", stream.generated)
        return Event(stream.id, text, False, None, stream.generated)

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the batch, in this order."""
        self._rows = [self._rows[r] for r in rows]
        self._groups = None
        if not rows:
            self._state, self._logp = None, None
            return
        assert self._logp is not None and self._state is not None
        index = torch.tensor(rows, dtype=torch.long)
        self._state = self.scorer.reorder(self._state, index)
        self._logp = self._logp.index_select(0, index.to(self._logp.device))


def prime_ids(vocab, prime: str, unknown: str = "error") -> np.ndarray:
    """The prime as ids; with no prime (or none left), start as if after a line break (or from the first symbol)."""
    check_unknown(unknown)
    bad = next((i for i, c in enumerate(prime) if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:  # an argument's undecodable byte, as Python passes it on (surrogateescape)
        raise DataError(
            f"the prime holds the byte 0x{ord(prime[bad]) - 0xDC00:02X} at character {bad + 1}, which is not UTF-8 text; "
            "give the prime as UTF-8 (or in a UTF-8 file with --prime-file)"
        )
    ids = vocab.encode(prime, unknown) if prime else np.zeros(0, dtype=np.int64)
    if len(ids) == 0:
        ids = vocab.encode("\n", unknown="skip")[:1] if vocab.kind in ("char", "spm") else np.zeros(0, dtype=np.int64)
        if len(ids) == 0:
            ids = np.zeros(1, dtype=np.int64)
    return np.asarray(ids, dtype=np.int64)
