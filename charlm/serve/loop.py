"""The decode loop: one thread that owns the model and a Streams object, and steps every active stream together.

    requests ──submit──► waiting (FIFO, bounded) ──admit──► Streams (≤ max_streams rows)
                                                               │ step(): one symbol per row
    handlers ◄──Handover (batched, on the event loop)◄── events

Each iteration: drop the streams of clients that went away, admit waiting requests while rows are free,
run one queued task (a score or a beam search) if any, then one `Streams.step()`: the streams whose prompt
is done join (the prompts run on Streams' priming thread meanwhile), then one symbol for every row. A
stream's text depends only on its own request and seed (Streams gives each its own generator and
settings), so batching changes no text.

Nothing here blocks the event loop: the handlers only append to a list under a lock, and the text comes
back through `Handover`. The thread sets its own torch thread count, so the model's threads and the HTTP
thread do not fight for the cores (on 2 cores a step beside a busy thread can run 10-20x slower).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable, Sequence, cast

import torch

from charlm import threads
from charlm.api import LanguageModel, Streams
from charlm.errors import CharlmError
from charlm.serve.errors import ApiError, busy, draining
from charlm.serve.handover import Handover
from charlm.serve.jobs import Job
from charlm.serve.limits import Limits
from charlm.serve.metrics import Metrics

log = logging.getLogger("charlm.serve")

IDLE_POLL = 0.1  # seconds the idle thread sleeps between looks at the drain deadline (a signal handler cannot wake it safely)
RETRY_AFTER = 1  # seconds a 429 asks the client to wait: rows free within a request's length at hundreds of symbols a second
# Streams running their prompts at once (on the priming thread, together): a burst of 64 arrivals is primed
# 16 at a time, so the first arrivals start generating sooner than if all 64 prompts ran as one batch.
MAX_PRIMING = 16
SHUTDOWN_REASON = "length"  # the finish reason of a stream cut at the end of the grace period (the one typed clients accept)


def model_threads() -> int:
    """Torch threads for the decode loop: an explicit count (`charlm --threads N`, $CHARLM_THREADS, $OMP_NUM_THREADS)
    if given, else charlm.threads' choice for batched work less one core for the HTTP event loop.

    That core is the event loop's: a step is many short parallel regions, and one of their threads
    descheduled by the server's own thread makes every region wait for it (the shared-CPU issue: 10-20x
    slower on 2 cores). On the 2-core development machine that leaves the model one thread.
    """
    explicit = threads.requested()
    if explicit is not None:
        return explicit
    return max(1, threads.choose("batch") - 1)


class DecodeLoop:
    """The thread that owns the model. submit() jobs, run_task() for scores and beams, cancel() for clients gone."""

    def __init__(self, lm: LanguageModel, limits: Limits, metrics: Metrics):
        self.lm = lm
        self.limits = limits
        self.metrics = metrics
        self._lock = threading.Lock()  # guards _waiting, _tasks, _cancelled (the handlers' side)
        self._waiting: collections.deque[Job] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], asyncio.Future]] = collections.deque()
        self._cancelled: list[Job] = []
        self._wake = threading.Event()
        self._drain_at: float | None = None  # set by the SIGTERM handler: a plain store, safe in a signal handler
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._handover: Handover | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        # The thread's own: stream id -> (job, choice index), and each job's stream ids.
        self._rows: dict[int, tuple[Job, int]] = {}
        self._ids: dict[Job, list[int]] = {}
        self.torch_threads = 0  # what the thread chose (model_threads), once it runs

    # -- the handlers' side (event loop) -------------------------------------------------------
    def start(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread (the app's lifespan calls this: a bad thread count fails the start, not the thread)."""
        self.torch_threads = model_threads()
        self._aio_loop = aio_loop
        self._handover = Handover(aio_loop, self.limits.flush_interval)
        self._thread = threading.Thread(target=self._run, name="charlm-decode", daemon=True)
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._drain_at is not None or self._stopping

    def submit(self, job: Job) -> None:
        """Queue a job for rows; raises 429 (queue full) or 503 (shutting down)."""
        if self.draining:
            raise draining()
        with self._lock:
            if len(self._waiting) + len(self._tasks) >= self.limits.max_queue:
                raise busy(RETRY_AFTER)
            self._waiting.append(job)
            self.metrics.queued_requests.set(len(self._waiting) + len(self._tasks))
        self._wake.set()

    async def run_task(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the decode thread between two steps (the model is the thread's alone) and return its result."""
        if self.draining:
            raise draining()
        assert self._aio_loop is not None
        future: asyncio.Future = self._aio_loop.create_future()
        with self._lock:
            if len(self._waiting) + len(self._tasks) >= self.limits.max_queue:
                raise busy(RETRY_AFTER)
            self._tasks.append((fn, future))
            self.metrics.queued_requests.set(len(self._waiting) + len(self._tasks))
        self._wake.set()
        return await future  # a client that goes away cancels the future: the thread then skips or drops the result

    def cancel(self, job: Job) -> None:
        """The client went away: its streams leave the batch before the next step (or it never joins)."""
        job.cancelled = True
        with self._lock:
            try:
                self._waiting.remove(job)
                self.metrics.queued_requests.set(len(self._waiting) + len(self._tasks))
                return
            except ValueError:
                self._cancelled.append(job)
        self._wake.set()

    def begin_drain(self, grace: float | None = None) -> None:
        """Take nothing new; the streams in flight (and queued) have `grace` seconds, then they end. Signal-safe."""
        if self._drain_at is None:
            self._drain_at = time.monotonic() + (self.limits.grace if grace is None else grace)

    def stop(self, timeout: float = 5.0) -> None:
        """End every stream (with a 503 for what has not finished) and join the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.torch_threads)  # this thread's OpenMP pool: the event loop's thread runs no torch
        streams = self._new_streams()
        assert self._handover is not None
        while not self._stopping:
            try:
                streams = self._iterate(streams)
            except Exception as e:  # a fault of this loop's own: its requests end with a 500, the loop goes on
                log.exception("the decode loop failed; its requests end with an error")
                self.metrics.model_errors.inc()
                self._fail_rows(
                    ApiError(f"the server failed while generating: {type(e).__name__}: {e}", 500, type="server_error")
                )
                streams.close()
                streams = self._new_streams()
        self._end_all(streams, draining())
        streams.close()
        self._handover.flush(force=True)

    @property
    def alive(self) -> bool:
        """The decode thread runs (for /health)."""
        return self._thread is not None and self._thread.is_alive()

    def _iterate(self, streams: Streams) -> Streams:
        """One turn: the clients gone, the grace period, admissions, a task, a step, the hand-over."""
        assert self._handover is not None
        self._wake.clear()
        self._drop_cancelled(streams)
        if self._past_grace():
            self._end_all(streams, None)
        self._admit(streams)
        worked = self._run_one_task()
        if streams.active:
            streams = self._step(streams)
        self.metrics.active_streams.set(streams.active)
        if not streams.active and not worked:
            self._handover.flush(force=True)
            if not self._has_work():
                self._wake.wait(IDLE_POLL)
        else:
            self._handover.flush()
        return streams

    def _new_streams(self) -> Streams:
        # The prompts run on a priming thread of their own while the batch steps (on 2 cores the event loop
        # leaves most of the second core idle), in shorter chunks than the API's default: the same calls, so
        # the same text, with memory bounded by the chunk.
        return Streams(self.lm.scorer, prime_chunk=self.limits.prime_chunk, background_primes=True)

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._tasks or self._cancelled)

    def _past_grace(self) -> bool:
        return self._drain_at is not None and time.monotonic() >= self._drain_at

    def _drop_cancelled(self, streams: Streams) -> None:
        with self._lock:
            gone, self._cancelled = self._cancelled, []
        for job in gone:
            for sid in self._ids.pop(job, []):
                streams.remove(sid)
                self._rows.pop(sid, None)

    def _admit(self, streams: Streams) -> None:
        """Waiting jobs join in order while their rows fit (a job bigger than the batch runs alone), and while
        fewer than MAX_PRIMING streams are still running their prompts."""
        assert self._handover is not None
        while True:
            with self._lock:
                if not self._waiting:
                    break
                job = self._waiting[0]
                if self._rows and len(self._rows) + job.rows > self.limits.max_streams:
                    break
                if self._rows and streams.active - streams.batch_size >= MAX_PRIMING:
                    break
                self._waiting.popleft()
                self.metrics.queued_requests.set(len(self._waiting) + len(self._tasks))
            if job.cancelled:
                continue
            ids: list[int] = []
            try:
                for spec in job.specs:
                    sid = streams.add(
                        cast(Sequence[int], spec.ids), spec.length, seed=spec.seed, stop=spec.stop or None, **spec.sampling
                    )
                    ids.append(sid)
                    self._rows[sid] = (job, spec.index)
            except Exception as e:  # a setting Streams refuses: this request fails, the others go on
                for sid in ids:
                    streams.remove(sid)
                    self._rows.pop(sid, None)
                status = 400 if isinstance(e, CharlmError) else 500
                self._handover.fail(
                    job, ApiError(str(e), status, type="invalid_request_error" if status == 400 else "server_error")
                )
                continue
            self._ids[job] = ids

    def _run_one_task(self) -> bool:
        with self._lock:
            if not self._tasks:
                return False
            fn, future = self._tasks.popleft()
            self.metrics.queued_requests.set(len(self._waiting) + len(self._tasks))
        if future.cancelled():
            return True
        assert self._handover is not None
        try:
            result, error = fn(), None
        except Exception as e:  # one request's failure, never the server's
            result, error = None, e
            if not isinstance(e, CharlmError):
                self.metrics.model_errors.inc()
                log.exception("a score or beam search failed")
        self._handover.call(_resolve, future, result, error)
        return True

    def _step(self, streams: Streams) -> Streams:
        """One Streams.step(); its events handed over. A failing step ends its streams with a 500, and the loop
        goes on with a fresh Streams (the failed one's state cannot be trusted)."""
        assert self._handover is not None
        start = time.perf_counter()
        try:
            events = streams.step()
        except Exception as e:
            self.metrics.model_errors.inc()
            log.exception("a decode step failed; its %d stream(s) end with an error", streams.active)
            self._fail_rows(ApiError(f"the model failed while generating: {type(e).__name__}: {e}", 500, type="server_error"))
            streams.close()
            return self._new_streams()
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        if events:
            self.metrics.batch_rows.observe(len(events))
        chars = 0
        for event in events:
            job, index = self._rows[event.stream]
            chars += len(event.text)
            # The first symbol of a streamed choice goes at once (time to first character); the rest in batches.
            self._handover.text(
                job, index, event.text, event.reason if event.finished else None, urgent=job.stream and event.symbols == 1
            )
            if event.finished:
                del self._rows[event.stream]
                ids = self._ids.get(job)
                if ids is not None:
                    ids.remove(event.stream)
                    if not ids:
                        del self._ids[job]
        if chars:
            self.metrics.generated_chars.inc(chars)
        return streams

    def _fail_rows(self, error: ApiError) -> None:
        """Every job in the batch ends with this error (the batch's state cannot be trusted: a fresh one follows)."""
        assert self._handover is not None
        for job in list(self._ids):
            self._handover.fail(job, error)
        self._rows.clear()
        self._ids.clear()

    def _end_all(self, streams: Streams, error: ApiError | None) -> None:
        """The grace period is over (or the server stops): every stream ends now, cleanly for its client."""
        assert self._handover is not None
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            tasks, self._tasks = list(self._tasks), collections.deque()
        for job in list(self._ids) + waiting:
            for sid in self._ids.pop(job, []):
                streams.remove(sid)
                self._rows.pop(sid, None)
            if error is not None:
                self._handover.fail(job, error)
            else:
                for spec in job.specs:
                    self._handover.text(job, spec.index, "", SHUTDOWN_REASON, urgent=True)
        for _, future in tasks:
            self._handover.call(_resolve, future, None, draining())
        self.metrics.queued_requests.set(0)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """On the event loop: hand a task's outcome to its waiting handler, unless the handler has gone."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
