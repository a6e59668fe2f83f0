"""Moving text from the decode-loop thread to the event loop in batches.

Every step gives each active stream one symbol: at 64 streams and ~2 ms a step that is tens of thousands
of pieces a second, far more than one Python event loop can wake handlers and write SSE chunks for. So
the decode thread collects the pieces and hands them over in one callback (one `call_soon_threadsafe`,
one wake-up of the event loop) at most every `interval` seconds; a stream's first text and every end go
at once, so the time to first character and the end of a request do not wait for the interval. Each
handler then writes everything its request gathered as one chunk.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

from charlm.serve.errors import ApiError
from charlm.serve.jobs import Job


class Handover:
    """The decode thread's outbox: put pieces, flush() when due; they reach the Jobs on the event loop.

    A choice's pieces since the last hand-over are joined into one (one `Job.feed` per choice per hand-over,
    not one per step), so the event loop's work grows with the number of clients, not with the step rate.
    """

    def __init__(self, aio_loop: asyncio.AbstractEventLoop, interval: float):
        self.aio_loop = aio_loop
        self.interval = interval
        self._lock = threading.Lock()
        self._texts: dict[tuple[Job, int], list[Any]] = {}  # (job, choice) -> [pieces, finish reason]
        self._calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = []  # after the texts: failures, task results
        self._urgent = False
        self._scheduled = False  # a callback is queued on the event loop and will take everything put so far
        self._last = 0.0

    def text(self, job: Job, index: int, text: str, reason: str | None, urgent: bool) -> None:
        with self._lock:
            entry = self._texts.get((job, index))
            if entry is None:
                self._texts[(job, index)] = [[text], reason]
            else:
                entry[0].append(text)
                entry[1] = reason or entry[1]
            self._urgent = self._urgent or urgent or reason is not None

    def fail(self, job: Job, error: ApiError) -> None:
        self.call(job.fail, error)

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the event loop after the pieces put so far, at the next flush (which comes at once)."""
        with self._lock:
            self._calls.append((fn, args))
            self._urgent = True

    def flush(self, force: bool = False) -> None:
        """Hand the pieces over if the interval has passed, or something is urgent, or force."""
        now = time.monotonic()
        with self._lock:
            if not (self._texts or self._calls) or self._scheduled:
                return
            if not (force or self._urgent or now - self._last >= self.interval):
                return
            self._scheduled, self._urgent, self._last = True, False, now
        try:
            self.aio_loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed (the server is gone): nobody is left to tell
            with self._lock:
                self._texts.clear()
                self._calls.clear()

    def _deliver(self) -> None:
        """On the event loop: everything put since the last delivery, texts first."""
        with self._lock:
            texts, self._texts = self._texts, {}
            calls, self._calls = self._calls, []
            self._scheduled, self._urgent = False, False
        for (job, index), (pieces, reason) in texts.items():
            job.feed(index, "".join(pieces), reason)
        for fn, args in calls:
            fn(*args)
