"""Asking a training run to stop, the way a user or a machine does it.

Ctrl-C (SIGINT), SIGTERM (batch schedulers, `docker stop`, `timeout`, spot-instance preemption;
torchrun passes it on to every rank) and SIGHUP (the terminal went away) all ask the run to finish
the step in flight, save last.safetensors and exit with code 1 and the command that resumes it.
A second Ctrl-C stops at once. Only the CLI makes one and passes it to charlm's `train` as its
`stop`: train enters it (installing the handlers) for the training loop only, so that Ctrl-C while
data is fetched or prepared interrupts at once, and the Trainer polls it. Library code never
touches process-wide signal state itself.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from charlm.errors import CharlmError

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class StopRequests:
    """A context manager that turns the stop signals into a polled reason: `stop()` -> 'SIGTERM' or None."""

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> str | None:
        return self.reason

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)  # no SIGHUP on Windows
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
        self.reason = self.reason or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class Stopped(CharlmError):
    """SIGTERM or SIGHUP outside training's loop (corpus get, prepare, train's start-up): the work ends at
    once, its partial files are removed on the way out (their own cleanup runs), and one line says so."""


class SignalsEnd:
    """A context manager under which SIGTERM and SIGHUP raise `Stopped` where the program is, as Ctrl-C
    raises KeyboardInterrupt: what a command has half-written is cleaned up by its own `finally`, where
    the default action (the process ends on the spot) would leave it. A second signal while that cleanup
    runs is ignored, so that the cleanup finishes."""

    def __init__(self, what: str):
        self.what = what  # what was stopped, for the one line: "corpus get", "prepare"
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalsEnd":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS[1:]:  # SIGINT already raises KeyboardInterrupt
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)  # the cleanup runs to its end
        name = signal.Signals(signum).name
        raise Stopped(f"{self.what} stopped by {name}; nothing half-written was left behind")

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
