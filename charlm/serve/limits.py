"""The server's caps and timings: one declaration each (type, default, meaning), read by the CLI for its
flags' defaults and by the app for its checks. Torch-free and server-library-free, so `charlm serve --help`
imports nothing heavy."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from charlm.errors import OptionError


@dataclass(frozen=True)
class Limits:
    """What one server accepts. Each field is a `charlm serve` flag of the same name (underscores as dashes)."""

    max_streams: int = 64  # rows stepped together in the batch; further requests wait in the queue
    max_queue: int = 256  # requests waiting for a row (or for a turn to score / beam search); past it: 429 with Retry-After
    max_length: int = 4096  # the largest max_tokens (symbols generated per choice)
    max_prompt: int = 32768  # characters of each prompt, and of a text to score
    max_n: int = 16  # choices per request (n, times the number of prompts)
    max_body: int = 1 << 20  # bytes of a request body; past it: 413
    max_beam_width: int = 16  # the largest beam_width (beam search runs between steps and pauses the other streams)
    # Prompt symbols a new stream runs per step. A prompt runs one stream alone, at about the cost of a
    # one-stream step per symbol (its weights read for one row), and the batch waits for it: 64 symbols
    # keep that pause to ~10-20 ms on a 2x512 CPU model, while the chunking changes no text.
    prime_chunk: int = 256
    grace: float = 10.0  # seconds SIGTERM gives the in-flight streams to finish before they are ended
    # Seconds between hand-overs of text to the clients (a stream's first text and every end go at once). Each
    # hand-over wakes the event loop for every client with text, and that Python holds the interpreter lock the
    # decode thread needs between its operators: at 64 clients 0.02 s gave 20,176 chars/s, 0.05 s 22,352 (2x512
    # fp32, AMD EPYC 2 cores, benchmarks/serve_load.py). Twenty pieces a second still reads as a smooth stream.
    flush_interval: float = 0.05

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise OptionError(f"{flag} must be a whole number >= 1 (got {value!r})")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise OptionError(f"{flag} must be a number of seconds >= 0 (got {value!r})")
        if self.max_n > self.max_streams:
            raise OptionError(
                f"--max-n ({self.max_n}) cannot exceed --max-streams ({self.max_streams}): "
                "a request's choices step together in the batch"
            )


DEFAULTS = Limits()
