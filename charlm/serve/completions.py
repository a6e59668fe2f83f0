"""POST /v1/completions: a checked request becomes a Job for the decode loop (or, with beam_width, a beam
search run between two steps); the answer in OpenAI's shape, whole or as server-sent events.

Usage counts characters (prompt_tokens: the prompts' characters, completion_tokens: the generated
characters), whatever the model's unit; max_tokens counts the model's symbols (characters, or pieces for a
SentencePiece model). Choice k (prompt k // n) uses seed + k, as `charlm sample --num-samples` does, so a
request with seed S and n=3 gives the texts of three requests with seeds S, S+1, S+2.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from charlm.decoding.streams import prime_ids, random_seed
from charlm.errors import DataError
from charlm.serve.errors import FieldError
from charlm.serve.jobs import Job, StreamSpec
from charlm.serve.schemas import CompletionRequest, parse_completion

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering: the text must arrive as it is made


@dataclass(frozen=True)
class Head:
    """The fields every object of one response repeats."""

    id: str
    created: int
    model: str
    fingerprint: str

    def wrap(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            **extra,
        }


def choice(index: int, text: str, reason: str | None, **extra: Any) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": reason, **extra}


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def complete(state: Any, request: Request, body: Any) -> Response:
    """Answer one completion request (state: the app's ServerState)."""
    req = parse_completion(body, state.limits)
    state.check_model(req.model)
    ids = [_encode(state.lm.vocab, p, req.unknown) for p in req.prompts]
    state.metrics.prompt_chars.inc(sum(len(p) for p in req.prompts))
    head = Head(f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_id, state.fingerprint)
    if req.beam_width is not None:
        return JSONResponse(await _beam(state, req, head))
    base = random_seed() >> 8 if req.seed is None else req.seed  # as `charlm sample` draws a seed
    specs = [
        StreamSpec(k, ids[k // req.n], req.max_tokens, req.sampling.keywords(), base + k, req.stop) for k in range(req.choices)
    ]
    job = Job(specs, stream=req.stream)
    if req.max_tokens == 0:  # nothing to generate: answered here, the loop never sees it
        for spec in specs:
            job.feed(spec.index, "", "length")
    else:
        state.loop.submit(job)
    if req.stream:
        return StreamingResponse(_events(state, req, head, job), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        if not await _finished_or_gone(job, request):
            return Response(status_code=499)  # nobody reads it; nginx's code for a client that closed the request
    finally:
        if not job.finished:
            state.loop.cancel(job)
    _observe_first_text(state, job)
    if job.error is not None:
        raise job.error
    texts = [job.text(k) for k in range(req.choices)]
    choices = [choice(k, (req.prompt_of(k) if req.echo else "") + texts[k], job.finish[k]) for k in range(req.choices)]
    return JSONResponse(head.wrap(choices, usage=_usage(req, texts)))


def _encode(vocab: Any, prompt: str, unknown: str) -> Any:
    try:
        return prime_ids(vocab, prompt, unknown)
    except DataError as e:
        raise FieldError("prompt", str(e).replace("--unknown skip", '"unknown": "skip"')) from None  # the CLI's flag, as a field


def _usage(req: CompletionRequest, texts: list[str]) -> dict[str, int]:
    prompt = sum(len(p) for p in req.prompts)
    completion = sum(len(t) for t in texts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _finished_or_gone(job: Job, request: Request) -> bool:
    """Wait for the job, or for the client to disconnect (then its rows are freed at once): True if finished."""
    done = asyncio.ensure_future(job.done.wait())
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        done.cancel()
        gone.cancel()
    return job.finished


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next message the server sends the app is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(state: Any, req: CompletionRequest, head: Head, job: Job) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed completion: everything a wake-up finds goes out as one write."""
    try:
        if req.echo:
            yield b"".join(sse(head.wrap([choice(k, req.prompt_of(k), None)])) for k in range(req.choices))
        while True:
            await job.ready.wait()
            parts = [sse(head.wrap([choice(k, text, reason)])) for k, text, reason in job.take()]
            if job.error is not None:  # the status line has gone: the error travels as an event (the openai package raises it)
                yield b"".join(parts) + sse(job.error.body()) + DONE
                return
            if job.finished:
                if req.include_usage:
                    parts.append(sse(head.wrap([], usage=_usage(req, [job.text(k) for k in range(req.choices)]))))
                yield b"".join(parts) + DONE
                return
            if parts:
                yield b"".join(parts)
    finally:  # a disconnect cancels this generator: the job's rows leave the batch before the next step
        if not job.finished:
            state.loop.cancel(job)
        _observe_first_text(state, job)


def _observe_first_text(state: Any, job: Job) -> None:
    if job.first_text_at is not None:
        state.metrics.first_char_seconds.observe(job.first_text_at - job.submitted)


async def _beam(state: Any, req: CompletionRequest, head: Head) -> dict[str, Any]:
    """Beam search (charlm's extension: beam_width, length_penalty): the n most likely continuations of each
    prompt, best first, each with its log-probability. It runs on the decode thread between two steps."""
    lm, stop = state.lm, req.stop[0] if req.stop else None

    def search() -> list[list[Any]]:
        return [
            lm.beam(
                p,
                req.max_tokens,
                beam_width=req.beam_width,
                n_best=req.n,
                length_penalty=req.length_penalty,
                stop=stop,
                unknown=req.unknown,
            )
            for p in req.prompts
        ]

    results = await state.loop.run_task(search)
    choices, texts = [], []
    for p, beams in enumerate(results):
        for j, b in enumerate(beams):
            text, reason = b.text, "length"
            if stop is not None and stop in text:  # the beam keeps its stop text; OpenAI's answers leave it out
                text, reason = text[: text.index(stop)], "stop"
            texts.append(text)
            choices.append(
                choice(
                    p * req.n + j,
                    (req.prompts[p] if req.echo else "") + text,
                    reason,
                    logprob=b.logprob,
                    bits_per_char=b.bits_per_char,
                )
            )
    return head.wrap(choices, usage=_usage(req, texts))
