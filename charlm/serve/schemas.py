"""Request bodies checked field by field: a wrong type or a value out of range is a FieldError (400) that names
the field, before anything reaches the decode loop. OpenAI's names and defaults where they exist; charlm's
own fields (top_k, greedy, unknown, beam_width, length_penalty) beside them.

Written by hand rather than with a schema library: the messages are the point (they say what to send
instead), and the rules are few.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from charlm.decoding.options import UNKNOWN_RULES
from charlm.serve.errors import FieldError
from charlm.serve.limits import Limits

MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-30  # charlm.decoding.sampling.MIN_TEMPERATURE, named here without importing torch
MAX_LENGTH_PENALTY = 10.0  # charlm.decoding.beam.MAX_LENGTH_PENALTY
MAX_STOPS = 4  # as OpenAI's completions
MAX_STOP_CHARS = 256

# OpenAI fields charlm takes only at their neutral value (a client library may send them): anything else is refused.
NEUTRAL: dict[str, tuple[Any, ...] | None] = {
    "logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "user": None,
}
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "greedy",
    "seed",
    "stop",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "echo",
    "unknown",
    "beam_width",
    "length_penalty",
    *NEUTRAL,
}
STREAM_OPTIONS = {
    "include_usage",
    "include_obfuscation",
}  # the second is OpenAI's padding against length side channels: moot here
SCORE_FIELDS = {"model", "text", "input", "unknown"}


@dataclass(frozen=True)
class Sampling:
    """How each choice picks its symbols: charlm's sampling settings (LanguageModel.stream's keywords)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def keywords(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "greedy": self.greedy}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked POST /v1/completions body. Choice k (prompt k // n, its (k % n)-th sample) uses seed + k."""

    model: str | None
    prompts: tuple[str, ...]
    n: int
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    unknown: str
    beam_width: int | None
    length_penalty: float

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, index: int) -> str:
        return self.prompts[index // self.n]


@dataclass(frozen=True)
class ScoreRequest:
    """A checked POST /v1/score body: the text to score (`text`, or `input` as OpenAI's embeddings name it)."""

    model: str | None
    text: str
    unknown: str


def parse_completion(body: Any, limits: Limits) -> CompletionRequest:
    """Check a completion body against the limits; the first problem is a FieldError naming its field."""
    body = _object(body)
    _known(body, COMPLETION_FIELDS, "/v1/completions")
    for name, allowed in NEUTRAL.items():
        if allowed is not None and name in body and body[name] not in allowed:
            raise FieldError(name, f"charlm does not support {name} (send it as null or leave it out)")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise FieldError("user", "must be a string")
    prompts = _prompts(body.get("prompt", ""), limits)
    n = _int(body, "n", 1, 1, limits.max_n)
    if len(prompts) * n > limits.max_n:
        raise FieldError(
            "n", f"{len(prompts)} prompts x n={n} make {len(prompts) * n} choices; the server's cap is {limits.max_n} (--max-n)"
        )
    best_of = body.get("best_of")
    if best_of is not None and (not _is_int(best_of) or best_of != n):
        raise FieldError(
            "best_of", f"charlm takes best_of only equal to n ({n}); for the most likely continuations use beam_width"
        )
    temperature = _number(body, "temperature", 1.0, 0.0, None)
    if 0 < temperature < MIN_TEMPERATURE:  # float32 cannot divide by less; its limit is greedy anyway
        raise FieldError("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (got {temperature})")
    greedy = _bool(body, "greedy", False) or temperature == 0.0  # OpenAI's temperature 0: the most likely symbol each time
    top_p = _number(body, "top_p", None, 0.0, 1.0, low_open=True)
    top_k = _int(body, "top_k", None, 1, None)
    sampling = Sampling(
        1.0 if greedy and temperature == 0.0 else temperature, top_k, None if top_p == 1.0 else top_p, greedy
    )  # top_p 1 keeps everything: the same as none
    beam_width = _int(body, "beam_width", None, 1, limits.max_beam_width)
    stream = _bool(body, "stream", False)
    if beam_width is not None:
        if stream:
            raise FieldError("stream", "beam search answers in one piece: leave stream out with beam_width")
        if body.get("max_tokens") == 0:
            raise FieldError("max_tokens", "beam search needs at least 1 symbol to generate")
        if n > beam_width:
            raise FieldError(
                "n", f"with beam search n is how many of the beam's best to return: at most beam_width ({beam_width})"
            )
    stop = _stops(body.get("stop"))
    if beam_width is not None and len(stop) > 1:
        raise FieldError("stop", "beam search takes one stop string")
    seed = _int(body, "seed", None, 0, MAX_SEED - limits.max_n)
    return CompletionRequest(
        model=_model(body),
        prompts=prompts,
        n=n,
        max_tokens=_int(body, "max_tokens", 16, 0, limits.max_length),
        sampling=sampling,
        seed=seed,
        stop=stop,
        stream=stream,
        include_usage=_stream_options(body.get("stream_options"), stream),
        echo=_bool(body, "echo", False),
        unknown=_choice(body, "unknown", "error", UNKNOWN_RULES),
        beam_width=beam_width,
        length_penalty=_number(body, "length_penalty", 0.0, -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY),
    )


def parse_score(body: Any, limits: Limits) -> ScoreRequest:
    """Check a score body: {"text": "..."} (or "input"), optional "unknown": "error" | "skip"."""
    body = _object(body)
    _known(body, SCORE_FIELDS, "/v1/score")
    name = "input" if "input" in body and "text" not in body else "text"
    text = body.get(name)
    if not isinstance(text, str):
        raise FieldError(name, f"give the text to score as a string (got {_kind(text)})")
    if len(text) < 2:
        raise FieldError(name, "the text to score needs at least 2 characters (the first is the context of the second)")
    if len(text) > limits.max_prompt:
        raise FieldError(name, f"{len(text)} characters; the server's cap is {limits.max_prompt} (--max-prompt)")
    return ScoreRequest(_model(body), text, _choice(body, "unknown", "error", UNKNOWN_RULES))


# -- one field each ------------------------------------------------------------------------------
def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise FieldError("body", f"the body must be a JSON object (got {_kind(body)})")
    return body


def _known(body: dict[str, Any], allowed: set[str], route: str) -> None:
    # A misspelt field (max_token, temprature) would otherwise be silently ignored.
    for name in body:
        if name not in allowed:
            raise FieldError(str(name)[:80], f"{route} has no such field (it takes: {', '.join(sorted(allowed))})")


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise FieldError("model", f"must be a string (got {_kind(model)})")
    return model


def _prompts(prompt: Any, limits: Limits) -> tuple[str, ...]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise FieldError(
            "prompt", f"must be a string or a non-empty list of strings (got {_kind(prompt)}; token ids are not taken)"
        )
    for p in prompts:
        if len(p) > limits.max_prompt:
            raise FieldError("prompt", f"{len(p)} characters; the server's cap is {limits.max_prompt} (--max-prompt)")
    return tuple(prompts)


def _stops(stop: Any) -> tuple[str, ...]:
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS:
        raise FieldError("stop", f"must be a string or a list of at most {MAX_STOPS} strings")
    for s in stops:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise FieldError("stop", f"each stop sequence must be a non-empty string of at most {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - STREAM_OPTIONS:
        raise FieldError("stream_options", 'must be an object with "include_usage": true or false')
    if not stream:
        raise FieldError("stream_options", "goes with stream: true")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise FieldError("stream_options", "include_usage must be true or false")
    return usage


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int | None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON writers that only know doubles send 16.0
    if not _is_int(value):
        raise FieldError(name, f"must be a whole number (got {_kind(value)})")
    if value < lo or (hi is not None and value > hi):
        upper = f" and {hi}" if hi is not None else ""
        where = f"between {lo}{upper}" if hi is not None else f">= {lo}"
        raise FieldError(name, f"must be {where} (got {value})")
    return value


def _number(body: dict[str, Any], name: str, default: float | None, lo: float, hi: float | None, low_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(name, f"must be a finite number (got {_kind(value)})")
    if value < lo or (low_open and value == lo) or (hi is not None and value > hi):
        interval = f"{'(' if low_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise FieldError(name, f"must be in {interval} (got {value})")
    return float(value)


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(name, f"must be true or false (got {_kind(value)})")
    return value


def _choice(body: dict[str, Any], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = body.get(name, default)
    if value not in allowed:
        raise FieldError(name, f"must be one of {', '.join(allowed)} (got {str(value)[:40]!r})")
    return value


def _kind(value: Any) -> str:
    """A value's JSON type, for messages (never the whole value: it may be huge)."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    kind = names.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if isinstance(value, (bool, int, float)) else kind
