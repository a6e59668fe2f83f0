"""`charlm serve` as its clients see it: a real server process on a free loopback port, driven by the official
`openai` package and by raw HTTP (httpx). A served completion is `charlm sample`'s text for the same settings
and seed (fp32), alone and beside 15 other streams; every error is an OpenAI-shaped body naming its field;
a client that goes away frees its row; SIGTERM ends the streams in flight cleanly and exits 0.

A model failure inside the decode loop is tested in-process (Starlette's TestClient), with a scorer made to fail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import WORDS, make_text, run, train_small

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key-0123"
STARTUP = 60.0  # seconds a server may take to import torch and load the model on a busy machine


class Server:
    """`python -m charlm.serve CKPT --port 0 ...` in a child process; its URL read from its first line."""

    def __init__(self, ckpt: Path, *args: str, key: str | None = KEY):
        env = {**os.environ, "CHARLM_THREADS": "1"}
        env.pop("CHARLM_API_KEY", None)
        cmd = [sys.executable, "-m", "charlm.serve", str(ckpt), "--port", "0", "--device", "cpu", "--dtype", "fp32", *args]
        if key:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + STARTUP
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"the server did not start in {STARTUP} s: {self.log}") from None
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            if found:
                self.url = found.group(1)
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log}")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def client(self, **options) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60, **options)

    def post(self, path: str, body, **kw) -> "httpx.Response":
        return httpx.post(
            self.url + path, json=body, headers=kw.pop("headers", self.headers), timeout=kw.pop("timeout", 60), **kw
        )

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from charlm.data import PreparedData
    from charlm.data import prepare as prep

    d = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_CORPORA_DIR", str(d / "corpora"))
        (d / "tiny.txt").write_text(make_text())
        prep.prepare([d / "tiny.txt"], d / "prepared")
        train_small(PreparedData(d / "prepared"), d / "run", max_steps=30)
    return d / "run" / "best.safetensors"


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-length", "20000", "--max-body", "100000", "--max-n", "8")
    yield s
    assert s.terminate() == 0, s.log


def sample(ckpt: Path, prime: str, length: int, seed: int, *flags) -> str:
    """`charlm sample`'s generated text (without the prime)."""
    r = run("sample", ckpt, "--prime", prime, "--length", length, "--seed", seed, "--dtype", "fp32", *flags)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(prime) and r.stdout.endswith("\n")
    return r.stdout[len(prime) : -1]


# -- completions through the openai package ------------------------------------------------------
def test_models_and_health(server):
    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == ["run/best"]
    assert client.models.retrieve("run/best").id == "run/best"
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # no key needed


def test_completion_equals_charlm_sample(server, ckpt):
    prime = "The quick brown"
    r = server.client().completions.create(
        model="run/best", prompt=prime, max_tokens=300, temperature=0.8, top_p=0.95, seed=7, extra_body={"top_k": 10}
    )
    expected = sample(ckpt, prime, 300, 7, "--temperature", 0.8, "--top-p", 0.95, "--top-k", 10)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prime), len(expected))  # characters


def test_long_prompt_runs_in_chunks_and_equals_sample(server, ckpt):
    prime = make_text(1500, seed=4)  # 1,500 symbols: 24 of the server's 64-symbol chunks, one per step
    r = server.client().completions.create(model="run/best", prompt=prime, max_tokens=100, seed=2)
    assert r.choices[0].text == sample(ckpt, prime, 100, 2)


def test_streamed_completion(server):
    client = server.client()
    settings = dict(model="run/best", prompt="A lazy dog", max_tokens=5000, temperature=0.9, seed=3)
    whole = client.completions.create(**settings).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **settings))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole
    assert sum(1 for t in texts if t) >= 2  # it arrives in pieces, as it is made
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(whole) and not chunks[-1].choices


def test_n3_is_three_seeds(server):
    client = server.client()
    r = client.completions.create(model="run/best", prompt="Seven", max_tokens=80, n=3, seed=11, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        alone = client.completions.create(model="run/best", prompt="Seven", max_tokens=80, seed=11 + c.index, temperature=1.0)
        assert c.text == alone.choices[0].text
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.completion_tokens == sum(len(c.text) for c in r.choices)
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(model="run/best", prompt="Seven", max_tokens=80, n=3, seed=11, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in r.choices]


def test_stop_sequences(server, ckpt):
    client = server.client()
    full = sample(ckpt, "The", 400, 5)
    assert "\n" in full  # the tiny model writes lines
    r = client.completions.create(model="run/best", prompt="The", max_tokens=400, seed=5, stop="\n")
    assert r.choices[0].text == full.split("\n")[0] and r.choices[0].finish_reason == "stop"
    two = client.completions.create(model="run/best", prompt="The", max_tokens=400, seed=5, stop=["\n", "o"])
    assert two.choices[0].text == re.split("\n|o", full)[0]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="run/best", prompt="The", max_tokens=400, seed=5, stop=["\n"], stream=True)
    )
    assert streamed == r.choices[0].text


def test_seed_reproducibility(server):
    client = server.client()
    ask = lambda seed: client.completions.create(model="run/best", prompt="Over a", max_tokens=100, seed=seed).choices[0].text  # noqa: E731
    assert ask(42) == ask(42)
    assert ask(42) != ask(43)
    greedy = client.completions.create(model="run/best", prompt="Over a", max_tokens=50, temperature=0).choices[0].text
    beam1 = server.post("/v1/completions", {"prompt": "Over a", "max_tokens": 50, "beam_width": 1}).json()
    assert beam1["choices"][0]["text"] == greedy  # beam width 1 is greedy decoding


def test_equals_sample_beside_15_streams(server, ckpt):
    """The target request runs while 15 others stream (different prompts, seeds and settings): same text as alone."""

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
            texts = [""] * 15
            started = [asyncio.Event() for _ in range(15)]
            done = [False] * 15

            async def neighbour(i: int) -> None:
                body = {
                    "prompt": f"A {WORDS[i % len(WORDS)]} ",
                    "max_tokens": 20000,
                    "seed": 100 + i,
                    "stream": True,
                    "temperature": 0.5 + 0.1 * (i % 5),
                    **({"top_k": 5} if i % 3 == 0 else {}),
                }
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            texts[i] += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                            if texts[i]:
                                started[i].set()
                done[i] = True

            tasks = [asyncio.create_task(neighbour(i)) for i in range(15)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            active = server.metric("charlm_active_streams")
            r = await client.post(
                "/v1/completions",
                json={"prompt": "The quick brown", "max_tokens": 300, "temperature": 0.8, "top_p": 0.95, "top_k": 10, "seed": 7},
            )
            still_running = not any(done)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return r.json()["choices"][0]["text"], active, still_running, list(texts)

    target, active, still_running, texts = asyncio.run(scenario())
    assert active >= 15 and still_running
    assert target == sample(ckpt, "The quick brown", 300, 7, "--temperature", 0.8, "--top-p", 0.95, "--top-k", 10)
    # the neighbours' own texts so far are their texts alone, too
    assert sample(ckpt, f"A {WORDS[0]} ", 60, 100, "--temperature", 0.5, "--top-k", 5) == texts[0][:60]
    assert sample(ckpt, f"A {WORDS[4]} ", 60, 104, "--temperature", 0.9) == texts[4][:60]
    # the neighbours went away: their rows are freed (each within a step)
    deadline = time.monotonic() + 10
    while server.metric("charlm_active_streams") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("charlm_active_streams") == 0


def test_score(server, ckpt):
    text = make_text(600, seed=9)
    r = server.post("/v1/score", {"text": text})
    assert r.status_code == 200, r.text
    path = ckpt.parent / "score.txt"
    path.write_text(text)
    cli = run("eval", ckpt, "--text", path, "--json")
    assert cli.exit_code == 0, cli.output
    assert r.json()["bits_per_char"] == pytest.approx(json.loads(cli.stdout)["bits_per_char"], rel=1e-6)
    assert r.json()["chars"] == len(text) - 1 == json.loads(cli.stdout)["chars"]  # the first character is context


def test_echo_and_max_tokens_zero(server):
    r = server.post("/v1/completions", {"prompt": "The", "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == "The" and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 0


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "hot"),
        ("temperature", -1),
        ("max_tokens", 10**9),
        ("max_tokens", 20001),
        ("max_tokens", 1.5),
        ("max_tokens", -1),
        ("n", 0),
        ("n", 9),
        ("top_p", 1.5),
        ("top_p", 0),
        ("top_k", 0),
        ("seed", -1),
        ("seed", "x"),
        ("prompt", 5),
        ("prompt", [1, 2]),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("stream", "yes"),
        ("logprobs", 5),
        ("echo", 1),
        ("frobnicate", 1),
        ("unknown", "drop"),
        ("beam_width", 100),
        ("stream_options", {"include_usage": True}),
    ],
)
def test_bad_field_is_400_naming_it(server, field, value):
    r = server.post("/v1/completions", {"prompt": "The", "max_tokens": 5, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_other_errors(server):
    r = server.post("/v1/completions", {"prompt": "Th€", "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "'€'" in r.json()["error"]["message"]
    assert server.post("/v1/completions", {"prompt": "Th€", "max_tokens": 5, "unknown": "skip"}).status_code == 200
    bad_json = httpx.post(server.url + "/v1/completions", content=b'{"prompt": ', headers=server.headers, timeout=10)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    assert server.post("/v1/completions", [1, 2]).status_code == 400
    huge = server.post("/v1/completions", {"prompt": "x" * 200_000})
    assert huge.status_code == 413 and "--max-body" in huge.json()["error"]["message"]
    other = server.post("/v1/completions", {"model": "gpt-4", "prompt": "The"})
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"
    assert server.post("/v1/score", {"text": "x"}).json()["error"]["param"] == "text"
    assert httpx.get(server.url + "/v1/nothing", headers=server.headers, timeout=10).status_code == 404
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().completions.create(model="run/best", prompt="The", temperature=-2)


def test_api_key(server):
    for path in ("/v1/models", "/metrics", "/"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "The"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert server.post("/v1/completions", {"prompt": "The"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/", timeout=10).headers["www-authenticate"].startswith("Basic")
    basic = base64.b64encode(f"me:{KEY}".encode()).decode()
    page = httpx.get(server.url + "/", headers={"Authorization": f"Basic {basic}"}, timeout=10)
    assert page.status_code == 200 and "Generate" in page.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics(server):
    server.client().completions.create(model="run/best", prompt="The", max_tokens=20)
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    for name in (
        "charlm_active_streams",
        "charlm_queued_requests",
        "charlm_generated_characters_total",
        "charlm_step_seconds_count",
        "charlm_time_to_first_character_seconds_count",
        'charlm_requests_total{route="/v1/completions",status="200"}',
    ):
        assert name in text, name
    assert server.metric("charlm_generated_characters_total") >= 20


# -- the queue, disconnects and SIGTERM ---------------------------------------------------------
def first_data(lines) -> str:
    """The first text from a stream's lines (an iterator kept by the caller: dropping it closes the connection)."""
    for line in lines:
        if line.startswith("data: {"):
            text = "".join(c["text"] for c in json.loads(line[6:])["choices"])
            if text:
                return text
    raise AssertionError("the stream ended without text")


def test_queue_bound_429_and_disconnect_frees_the_row(ckpt):
    s = Server(ckpt, "--max-streams", "1", "--max-queue", "1", "--max-n", "1", "--max-length", "10000000")
    try:
        long = {"prompt": "The", "max_tokens": 10_000_000, "stream": True}
        with (
            httpx.Client(base_url=s.url, headers=s.headers, timeout=30) as a,
            httpx.Client(base_url=s.url, headers=s.headers, timeout=30) as b,
        ):
            with a.stream("POST", "/v1/completions", json=long) as first:
                first_lines = first.iter_lines()
                assert first_data(first_lines)  # it holds the one row
                with b.stream("POST", "/v1/completions", json=long) as second:  # it waits in the queue of one
                    assert second.status_code == 200
                    second_lines = second.iter_lines()
                    deadline = time.monotonic() + 10
                    while s.metric("charlm_queued_requests") < 1 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    third = s.post("/v1/completions", {"prompt": "The", "max_tokens": 5})
                    assert third.status_code == 429 and third.headers["retry-after"].isdigit()
                    assert third.json()["error"]["type"] == "rate_limit_error"
                    with pytest.raises(openai.RateLimitError):
                        s.client().completions.create(model="run/best", prompt="The", max_tokens=5)
                    first.close()  # the first client goes away: the second gets the row
                    assert first_data(second_lines)
                    assert s.metric("charlm_active_streams") == 1
        deadline = time.monotonic() + 10  # both gone: nothing left in the batch or the queue
        while (s.metric("charlm_active_streams") or s.metric("charlm_queued_requests")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("charlm_active_streams") == 0 and s.metric("charlm_queued_requests") == 0
        assert s.post("/v1/completions", {"prompt": "The", "max_tokens": 5}).status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # a client that stops waiting for a whole (unstreamed) answer
            s.post("/v1/completions", {"prompt": "The", "max_tokens": 10_000_000}, timeout=1.0)
        deadline = time.monotonic() + 10
        while s.metric("charlm_active_streams") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("charlm_active_streams") == 0
    finally:
        assert s.terminate() == 0, s.log


def test_sigterm_ends_streams_cleanly_and_exits_0(ckpt):
    s = Server(ckpt, "--grace", "2", "--max-length", "10000000")
    events: list[str] = []
    short: list[str] = []

    def read(body, into):
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers, timeout=60) as r:
            into.extend(line for line in r.iter_lines() if line.startswith("data: "))

    long = threading.Thread(target=read, args=({"prompt": "The", "max_tokens": 10_000_000, "stream": True}, events))
    quick = threading.Thread(target=read, args=({"prompt": "A", "max_tokens": 20000, "stream": True, "seed": 1}, short))
    long.start()
    quick.start()
    deadline = time.monotonic() + 30
    while not (events and short) and time.monotonic() < deadline:  # both streams under way
        time.sleep(0.02)
    start = time.monotonic()
    assert s.terminate(timeout=30) == 0, s.log
    assert time.monotonic() - start < 2 + 8  # the grace period and the last writes
    long.join(10)
    quick.join(10)
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert short[-1] == "data: [DONE]"
    assert not any("Traceback" in line for line in s.log), s.log
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health", timeout=2)


# -- in-process: a model failure ends its requests, never the server ---------------------------
def test_model_error_fails_its_requests_only(ckpt):
    from starlette.testclient import TestClient

    import charlm
    from charlm.serve.app import create_app

    lm = charlm.load(ckpt, device="cpu", dtype="fp32")
    real = lm.scorer
    failing = {"on": False}

    class Flaky:
        """The model's scorer, failing its batched step while failing["on"]."""

        def __getattr__(self, name):
            return getattr(real, name)

        def step(self, ids, state):
            if failing["on"]:
                raise RuntimeError("injected failure")
            return real.step(ids, state)

    lm.scorer = Flaky()
    with TestClient(create_app(lm)) as client:
        failing["on"] = True
        r = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 50})
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
        with client.stream("POST", "/v1/completions", json={"prompt": "The", "max_tokens": 50, "stream": True}) as streamed:
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert "injected failure" in lines[-2] and lines[-1] == "data: [DONE]"
        failing["on"] = False
        ok = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 50, "seed": 1})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == lm.generate("The", 50, seed=1)
        assert "charlm_model_errors_total 2.0" in client.get("/metrics").text


def test_cli_help_imports_no_server_stack():
    code = "import sys, charlm.cli.serve; print(sorted(m for m in ('torch', 'starlette', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
