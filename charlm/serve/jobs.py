"""One request's streams, as its HTTP handler and the decode loop share them.

The decode loop reads a Job's specs and its `cancelled` flag; every other field belongs to the event
loop (the hand-over calls `feed` and `fail` there), so no lock is needed: text reaches the handler only
through the event loop's own queue of callbacks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from charlm.serve.errors import ApiError


@dataclass(frozen=True)
class StreamSpec:
    """One choice to generate: Streams.add's arguments."""

    index: int  # the choice's index in the response
    ids: np.ndarray  # the prompt as ids (prime_ids: an empty prompt starts as after a line break)
    length: int  # symbols to generate (max_tokens)
    sampling: dict[str, Any]  # temperature, top_k, top_p, greedy
    seed: int
    stop: tuple[str, ...]


class Job:
    """A completion request's choices: the text each has produced, how each ended, or the error that ended them."""

    def __init__(self, specs: list[StreamSpec], stream: bool):
        self.specs = specs
        self.stream = stream  # a streamed answer wants its first text at once (time to first character)
        self.cancelled = False  # the client went away: set by the handler, read by the decode loop
        n = len(specs)
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.error: ApiError | None = None
        self.submitted = time.monotonic()
        self.first_text_at: float | None = None
        self._unsent: list[tuple[int, str, str | None]] = []  # (index, text, finish reason) not yet written
        self._open = n
        self.ready = asyncio.Event()  # something to write
        self.done = asyncio.Event()  # every choice has ended, or an error ended them all

    @property
    def rows(self) -> int:
        """Rows of the batch this job takes."""
        return len(self.specs)

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def text(self, index: int) -> str:
        return "".join(self.texts[index])

    # -- called on the event loop by the hand-over ---------------------------------------------
    def feed(self, index: int, text: str, reason: str | None) -> None:
        """A choice's new text, and its finish reason when it has ended."""
        if self.finish[index] is not None or self.error is not None:
            return
        if text:
            if self.first_text_at is None:
                self.first_text_at = time.monotonic()
            self.texts[index].append(text)
        if text or reason:
            self._unsent.append((index, text, reason))
            self.ready.set()
        if reason is not None:
            self.finish[index] = reason
            self._open -= 1
            if self._open == 0:
                self.done.set()

    def fail(self, error: ApiError) -> None:
        """End every open choice with this error (a model failure, a shutdown, a refused setting)."""
        if self.done.is_set():
            return
        self.error = error
        self.ready.set()
        self.done.set()

    def take(self) -> list[tuple[int, str, str | None]]:
        """The pieces not yet written, in order, each choice's consecutive pieces joined into one."""
        self.ready.clear()
        pieces, self._unsent = self._unsent, []
        merged: dict[int, list[Any]] = {}
        order: list[int] = []
        for index, text, reason in pieces:
            if index not in merged:
                merged[index] = [[], None]
                order.append(index)
            merged[index][0].append(text)
            merged[index][1] = reason or merged[index][1]
        return [(i, "".join(merged[i][0]), merged[i][1]) for i in order]
