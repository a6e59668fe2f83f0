"""The ASGI app: OpenAI-compatible routes, charlm's own (score, health, metrics), the page, the API key.

    GET  /                 the page (prime, temperature, length, Generate; bits/char of a pasted text)
    GET  /health           {"status": "ok"} (503 "draining" after SIGTERM); the one route without the key
    GET  /metrics          Prometheus text
    GET  /v1/models        the one model served (GET /v1/models/{id} too)
    POST /v1/completions   OpenAI's completions (+ top_k, greedy, unknown, beam_width, length_penalty)
    POST /v1/score         bits per character of a text

Starlette rather than FastAPI: the routes are few and their validation is hand-written for its messages
(schemas.py), so FastAPI's generated models would add a layer (and 422s to translate) without saving code;
and every layer runs on the event loop's one core, beside the model's. See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from charlm import __version__
from charlm.api import LanguageModel
from charlm.errors import CharlmError, DataError
from charlm.serve.completions import complete
from charlm.serve.errors import ApiError, FieldError, error_body
from charlm.serve.limits import DEFAULTS, Limits
from charlm.serve.loop import DecodeLoop
from charlm.serve.metrics import Metrics
from charlm.serve.schemas import parse_score

log = logging.getLogger("charlm.serve")

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/score")


def default_model_id(paths: Sequence[Path]) -> str:
    """The model's name in /v1/models: run-dir/stem of each checkpoint ("shk/best"), an ensemble's joined by "+"."""
    return "+".join(f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem for p in paths)


@dataclass
class ServerState:
    """What the routes share: the model, its decode loop, the limits, the figures."""

    lm: LanguageModel
    loop: DecodeLoop
    limits: Limits
    metrics: Metrics
    model_id: str
    created: int = 0
    fingerprint: str = field(default="")

    def check_model(self, model: str | None) -> None:
        """A request may leave `model` out, or name the model served here."""
        if model is not None and model != self.model_id:
            raise ApiError(
                f"model {model!r} is not served here; this server serves {self.model_id!r} (GET /v1/models)",
                404,
                param="model",
                code="model_not_found",
            )


def create_app(
    lm: LanguageModel, limits: Limits = DEFAULTS, *, api_key: str | None = None, model_id: str | None = None
) -> Starlette:
    """The app over a loaded model. Its decode loop starts with the app (ASGI lifespan) and stops with it;
    app.state.server.loop.begin_drain() is what SIGTERM calls (server.py)."""
    metrics = Metrics()
    state = ServerState(
        lm,
        DecodeLoop(lm, limits, metrics),
        limits,
        metrics,
        model_id or default_model_id(lm.paths),
        int(time.time()),
        f"charlm-{__version__}-{lm.dtype}",
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.loop.stop()

    r = Routes(state)
    routes = [
        Route("/", r.index),
        Route("/health", r.health),
        Route("/metrics", r.metrics),
        Route("/v1/models", r.models),
        Route("/v1/models/{model:path}", r.model),
        Route("/v1/completions", r.completions, methods=["POST"]),
        Route("/v1/score", r.score, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, CharlmError: _charlm_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)  # type: ignore[arg-type]
    if api_key:
        app.add_middleware(KeyCheck, key=api_key)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts the 401s too
    app.state.server = state
    return app


class Routes:
    """The route handlers, over the state they share."""

    def __init__(self, state: ServerState):
        self.state = state
        self.page = resources.files("charlm.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def health(self, request: Request) -> Response:
        loop = self.state.loop
        if loop.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not loop.alive:
            return JSONResponse({"status": "failed: the decode loop is not running"}, 503)
        return JSONResponse({"status": "ok", "model": self.state.model_id, "torch_threads": loop.torch_threads})

    async def metrics(self, request: Request) -> Response:
        return Response(self.state.metrics.render(), media_type=self.state.metrics.content_type)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(self.state)]})

    async def model(self, request: Request) -> Response:
        self.state.check_model(request.path_params["model"])
        return JSONResponse(_model_card(self.state))

    async def completions(self, request: Request) -> Response:
        return await complete(self.state, request, await read_json(request, self.state.limits.max_body))

    async def score(self, request: Request) -> Response:
        """Bits per character of a text: lm.score on the decode thread, between two steps."""
        state = self.state
        req = parse_score(await read_json(request, state.limits.max_body), state.limits)
        state.check_model(req.model)
        state.metrics.prompt_chars.inc(len(req.text))
        try:
            result = await state.loop.run_task(lambda: state.lm.score(req.text, unknown=req.unknown))
        except DataError as e:
            raise FieldError("text", str(e)) from None
        return JSONResponse({"object": "score", "model": state.model_id, **result.figures()})


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "charlm",
        "vocab_size": len(state.lm.vocab),
        "dtype": state.lm.dtype,
        "max_streams": state.limits.max_streams,
    }


async def read_json(request: Request, max_body: int) -> Any:
    """The body as JSON, at most max_body bytes (413 past it, before reading the rest)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise _too_large(max_body)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(f"the body is not valid JSON: {str(e)[:200]}", 400, param="body") from None


def _too_large(max_body: int) -> ApiError:
    return ApiError(f"the body is larger than the server's cap of {max_body} bytes (--max-body)", 413, param="body")


# -- errors as OpenAI-shaped bodies ----------------------------------------------------------------
async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    return JSONResponse(e.body(), e.status, headers=e.headers)


async def _charlm_error(request: Request, e: Exception) -> Response:
    return JSONResponse(error_body(str(e)), 400)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    kind = "not_found" if e.status_code == 404 else None
    return JSONResponse(
        error_body(f"{request.method} {request.url.path}: {e.detail}", code=kind), e.status_code, headers=e.headers
    )


async def _server_error(request: Request, e: Exception) -> Response:
    log.error("an error in %s %s", request.method, request.url.path, exc_info=e)
    return JSONResponse(error_body(f"the server failed on this request: {type(e).__name__}", "server_error"), 500)


# -- middleware --------------------------------------------------------------------------------
class KeyCheck:
    """Every route but /health needs the key: `Authorization: Bearer KEY` (the openai package sends it), or
    HTTP Basic with the key as the password (a browser asks for it on the page, then sends it itself)."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or self._allowed(scope):
            return await self.app(scope, receive, send)
        page = scope["path"] == "/"
        challenge = 'Basic realm="charlm", charset="UTF-8"' if page else 'Bearer realm="charlm"'
        body = error_body("a valid API key is required: send the header Authorization: Bearer KEY", code="invalid_api_key")
        await JSONResponse(body, 401, headers={"WWW-Authenticate": challenge})(scope, receive, send)

    def _allowed(self, scope: Any) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, value = header.partition(b" ")
        token = value.strip()
        if scheme.lower() == b"basic":
            try:
                token = base64.b64decode(token, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token, self.key)  # constant time: the key cannot be guessed byte by byte


class CountRequests:
    """charlm_requests_total{route, status} for every answer (unknown paths counted as "other": a bounded label)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
