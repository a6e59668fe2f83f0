"""`charlm serve`: an HTTP server (OpenAI-compatible routes, a page) over one decode loop that steps every
client's stream together (continuous batching).

    lm = charlm.load("run/best.safetensors")
    charlm.serve.server.run(lm, host="127.0.0.1", port=8000, limits=Limits())

The modules, one job each: limits (the caps and their defaults, torch-free: the CLI reads them for its
help), errors (OpenAI-shaped error bodies), schemas (request validation), jobs (one request's streams as
the loop and its handler share them), loop (the decode-loop thread that owns the model), metrics
(Prometheus), app (the ASGI app and its routes), completions (the completion responses and SSE), server
(uvicorn, the socket, SIGTERM). Importing this package imports none of them: `charlm --help` stays fast.
See docs/serve.md.
"""
