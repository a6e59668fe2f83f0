"""Asking a training run to stop, the way a user or a machine does it.

Ctrl-C (SIGINT), SIGTERM (batch schedulers, `docker stop`, `timeout`, spot-instance preemption;
torchrun passes it on to every rank) and SIGHUP (the terminal went away) all ask the run to finish
the step in flight, save last.safetensors and exit with code 1 and the command that resumes it.
A second Ctrl-C stops at once. Only the CLI installs these handlers; the Trainer polls the
callable it is given, so library code never touches process-wide signal state.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class StopRequests:
    """A context manager that turns the stop signals into a polled reason: `stop()` -> 'SIGTERM' or None."""

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

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
