"""`charlm serve`: the model behind an OpenAI-compatible HTTP API and a page (charlm/serve/, docs/serve.md).

Parse the options, load the model, bind the socket, print where it listens, serve until SIGTERM. The server
stack (uvicorn, starlette) and torch are imported when the command runs, never for --help.
"""

from __future__ import annotations

import ipaddress
from typing import Optional

import typer
from typing_extensions import Annotated

from charlm.cli.app import app, err, friendly
from charlm.cli.decode import DECODE_DTYPES, CkptArg, CombineOpt, WeightsOpt, load_model
from charlm.serve.limits import DEFAULTS, Limits


@app.command()
@friendly
def serve(
    checkpoints: CkptArg,
    host: Annotated[
        str, typer.Option(help="Address to listen on; the default takes connections from this machine only.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one (printed).")] = 8000,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one), cpu, cuda or mps.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="Precision of generation: auto (the fastest measured here), fp32, bf16 or int8. Only fp32 gives exactly `charlm sample --dtype fp32`'s text."
        ),
    ] = "auto",
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
    api_key: Annotated[
        Optional[str],
        typer.Option(
            envvar="CHARLM_API_KEY",
            show_default=False,
            help="Require this key (Authorization: Bearer KEY) on every route but /health. Default: $CHARLM_API_KEY; none: no key.",
        ),
    ] = None,
    model_name: Annotated[
        Optional[str], typer.Option(show_default=False, help="The model's id in /v1/models (default: run-dir/checkpoint-stem).")
    ] = None,
    max_streams: Annotated[
        int, typer.Option(help="Streams stepped together; more requests wait in the queue.")
    ] = DEFAULTS.max_streams,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for a row; past it: 429 with Retry-After.")
    ] = DEFAULTS.max_queue,
    max_length: Annotated[int, typer.Option(help="The largest max_tokens (symbols per choice).")] = DEFAULTS.max_length,
    max_prompt: Annotated[int, typer.Option(help="Characters of a prompt, or of a text to score.")] = DEFAULTS.max_prompt,
    max_n: Annotated[int, typer.Option(help="Choices per request.")] = DEFAULTS.max_n,
    max_body: Annotated[int, typer.Option(help="Bytes of a request body; past it: 413.")] = DEFAULTS.max_body,
    max_beam_width: Annotated[
        int, typer.Option(help="The largest beam_width (a beam search pauses the other streams while it runs).")
    ] = DEFAULTS.max_beam_width,
    prime_chunk: Annotated[
        int, typer.Option(help="Prompt symbols a new stream runs per step: a long prompt pauses the others this much at a time.")
    ] = DEFAULTS.prime_chunk,
    grace: Annotated[float, typer.Option(help="Seconds SIGTERM gives the streams in flight before they end.")] = DEFAULTS.grace,
    flush_interval: Annotated[
        float, typer.Option(help="Seconds between hand-overs of text to the clients (first text and ends go at once).")
    ] = DEFAULTS.flush_interval,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs the event loop time under load).")] = False,
):
    """Serve a model over HTTP: OpenAI-compatible completions, scoring, a page at /; every client's stream steps together."""
    limits = Limits(
        max_streams=max_streams,
        max_queue=max_queue,
        max_length=max_length,
        max_prompt=max_prompt,
        max_n=max_n,
        max_body=max_body,
        max_beam_width=max_beam_width,
        prime_chunk=prime_chunk,
        grace=grace,
        flush_interval=flush_interval,
    )  # checked before the model loads
    if not 0 <= port <= 65535:
        raise typer.BadParameter(f"must be between 0 and 65535 (got {port})", param_hint="--port")
    from charlm.serve.server import bind  # the server stack, only now
    from charlm.serve.server import serve as run_server

    sock = bind(host, port)  # before the model loads: a port in use is an error at once (connections wait meanwhile)
    try:
        lm = load_model(checkpoints, device, dtype, weights, combine, allowed=("auto", *DECODE_DTYPES))
        from charlm.serve.app import create_app

        app_ = create_app(lm, limits, api_key=api_key or None, model_id=model_name)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    state = app_.state.server
    err.print(
        f"charlm serve: {state.model_id} ({lm.dtype}, {lm.device}) on http://{where}:{bound}/ "
        f"(max {limits.max_streams} streams, queue {limits.max_queue}{', API key required' if api_key else ''})",
        soft_wrap=True,
    )
    if not api_key and not _loopback(host):
        err.print(f"warning: listening on {host} without an API key: anyone who can reach it can use it (--api-key)")
    run_server(app_, sock, access_log=access_log)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
