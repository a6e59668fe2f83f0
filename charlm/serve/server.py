"""Running the app: the listening socket, uvicorn, and a clean SIGTERM.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections and waits for the open ones; the decode loop
takes no new request (503) and gives the streams in flight `grace` seconds, then ends them (finish reason
"length", then [DONE]); the process exits 0. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import signal
import socket
from typing import Any

import uvicorn

from charlm.errors import CharlmError
from charlm.serve.loop import DecodeLoop

FINAL_WRITES = 3.0  # seconds uvicorn waits past the grace period for the last events to be written


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts: port 0 picks a free port (sock.getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CharlmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # connections that arrive before the event loop runs wait in the kernel's queue
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling the decode loop to drain the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, loop: DecodeLoop):
        super().__init__(config)
        self.decode_loop = loop

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.decode_loop.begin_drain()  # a plain store: safe inside a signal handler
        super().handle_exit(sig, frame)


def serve(app: Any, sock: socket.socket, *, access_log: bool = False) -> None:
    """Serve the app (create_app's) on the bound socket until SIGTERM or Ctrl-C, then drain and return."""
    state = app.state.server
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=int(state.limits.grace + FINAL_WRITES + 0.999),
    )
    server = _Server(config, state.loop)
    # uvicorn re-raises the signal it caught once it has shut down, under the handler it found: a handler that
    # does nothing makes that a clean exit (status 0) rather than death by SIGTERM or a KeyboardInterrupt.
    quiet = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise CharlmError("the server did not start (see the log above)")


def _ignore(sig: int, frame: Any) -> None:
    """After uvicorn's shutdown: the signal has done its work."""
