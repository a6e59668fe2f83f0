"""A soak of `charlm serve`: minutes of valid requests mixed with malformed JSON, wrong types, huge bodies,
max_tokens 0 and over the cap, clients that disconnect mid-stream and bursts over the queue bound.

    python benchmarks/serve_soak.py                      # 3 minutes, a random 2x128 LSTM
    python benchmarks/serve_soak.py --duration 300 --checkpoint run/best.safetensors --json soak.json
    python benchmarks/serve_soak.py --quick              # 20 s: checks that it runs

It passes when the server stays up, every valid request gets a correct answer (its text is the text the
API gives for the same prompt, settings and seed; or, inside a burst past the queue bound, a 429 with
Retry-After), every bad request gets its 4xx, no row is left active at the end, resident memory after the
warm-up grows by less than 10%, and SIGTERM then ends the server with status 0. The counts are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from serve_load import HOST, Connection, ServerProcess, make_checkpoint, sample_text

LIMITS = ["--max-streams", "16", "--max-queue", "32", "--max-length", "2000", "--max-body", "65536", "--max-n", "4"]
MAX_LENGTH, MAX_BODY, ROWS_AND_QUEUE = 2000, 65536, 16 + 32


@dataclass(frozen=True)
class Valid:
    """A valid request and the texts the API gives for it (choice k: seed + k)."""

    body: dict
    texts: tuple[str, ...]


def valid_pool(ckpt: Path, text: str, size: int, seed: int = 0) -> list[Valid]:
    """Requests with their expected texts, computed through the API (lm.generate) in this process."""
    import torch

    import charlm

    torch.set_num_threads(1)
    lm = charlm.load(ckpt, device="cpu", dtype="fp32")
    rng = random.Random(seed)
    pool = []
    for i in range(size):
        at = rng.randrange(len(text) - 200)
        prompt = text[at : at + rng.choice([1, 20, 100, 150])]
        settings = rng.choice(
            [{"temperature": 0.8}, {"temperature": 1.0, "top_k": 5}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0}]
        )
        n, length, stop = rng.choice([1, 1, 1, 2]), rng.choice([1, 30, 120, 300]), rng.choice([None, None, "\n", [".", "x"]])
        body = {"prompt": prompt, "max_tokens": length, "seed": 1000 + i, "n": n, **settings, **({"stop": stop} if stop else {})}
        api = {"temperature": 1.0, "greedy": True} if settings.get("temperature") == 0 else dict(settings)
        texts = tuple(lm.generate(prompt, length, seed=1000 + i + k, stop=stop, **api) for k in range(n))
        pool.append(Valid(body, texts))
    return pool


class Soak:
    """The request kinds, each returning its outcome: "ok", or what went wrong."""

    def __init__(self, port: int, pool: list[Valid], rng: random.Random):
        self.port, self.pool, self.rng = port, pool, rng
        self.counts: Counter[tuple[str, str]] = Counter()
        self.failures: list[str] = []
        self.in_burst = False

    def note(self, kind: str, outcome: str, detail: str = "") -> None:
        self.counts[(kind, outcome)] += 1
        if outcome not in ("ok", "429") and len(self.failures) < 50:
            self.failures.append(f"{kind}: {outcome} {detail[:300]}")

    async def post(self, body: bytes, conn: Connection | None = None) -> tuple[int, bytes]:
        own = conn is None
        conn = conn or Connection(self.port)
        data = bytearray()
        try:
            status = await conn.request("/v1/completions", body, data.extend)
        finally:
            if own:
                conn.close()
        return status, bytes(data)

    async def valid(self, conn: Connection, stream: bool) -> None:
        kind = "valid stream" if stream else "valid"
        v = self.rng.choice(self.pool)
        body = dict(v.body, stream=stream)
        if stream:
            raw = bytearray()  # parsed once at the end: an event may straddle two reads
            status = await conn.request("/v1/completions", json.dumps(body).encode(), raw.extend)
            if status != 200:
                self._refused(kind, status, bytes(raw))
                return
            got: dict[int, str] = {}
            error = None
            for event in bytes(raw).split(b"\n\n"):
                if event.startswith(b"data: {"):
                    obj = json.loads(event[6:])
                    error = error or obj.get("error")
                    for c in obj.get("choices", []):
                        got[c["index"]] = got.get(c["index"], "") + c["text"]
            texts = tuple(got.get(k, "") for k in range(len(v.texts)))
            done = raw.endswith(b"data: [DONE]\n\n")
            self.note(
                kind, "ok" if texts == v.texts and done and not error else "wrong text", f"{texts!r} != {v.texts!r} {error}"
            )
            return
        status, data = await self.post(json.dumps(body).encode(), conn)
        if status == 200:
            texts = tuple(c["text"] for c in sorted(json.loads(data)["choices"], key=lambda c: c["index"]))
            self.note(kind, "ok" if texts == v.texts else "wrong text", f"{texts!r} != {v.texts!r}")
        else:
            self._refused(kind, status, data)

    def _refused(self, kind: str, status: int, data: bytes) -> None:
        if status == 429 and self.in_burst:
            self.note(kind, "429")
        else:
            self.note(kind, f"status {status}", data.decode(errors="replace"))

    async def bad(self, conn: Connection) -> None:
        """A malformed or out-of-range request: its 4xx, with the field named where there is one."""
        choice = self.rng.randrange(7)
        v = self.rng.choice(self.pool).body
        if choice == 0:
            kind, body, want, param = "malformed JSON", json.dumps(v).encode()[: self.rng.randrange(1, 20)], 400, "body"
        elif choice == 1:
            kind, body, want, param = "not UTF-8", b'{"prompt": "\xff\xfe"}', 400, "body"
        elif choice == 2:
            field, value = self.rng.choice(
                [
                    ("temperature", "hot"),
                    ("max_tokens", "ten"),
                    ("n", 1.5),
                    ("seed", [1]),
                    ("stop", 7),
                    ("prompt", {"a": 1}),
                    ("stream", "no"),
                    ("top_k", -3),
                    ("echo", 0),
                ]
            )
            kind, body, want, param = "wrong type", json.dumps(dict(v, **{field: value})).encode(), 400, field
        elif choice == 3:
            kind, body, want, param = (
                "max_tokens over the cap",
                json.dumps(dict(v, max_tokens=MAX_LENGTH + 1)).encode(),
                400,
                "max_tokens",
            )
        elif choice == 4:
            kind, body, want, param = "unknown field", json.dumps(dict(v, temprature=1)).encode(), 400, "temprature"
        elif choice == 5:
            kind, body, want, param = "not an object", b"[1, 2, 3]", 400, "body"
        else:
            body = json.dumps(dict(v, max_tokens=0, stream=False)).encode()
            status, data = await self.post(body, conn)
            ok = status == 200 and all(c["text"] == "" for c in json.loads(data)["choices"])
            self.note("max_tokens 0", "ok" if ok else f"status {status}", data.decode(errors="replace"))
            return
        status, data = await self.post(body, conn)
        try:
            got = json.loads(data)["error"]["param"]
        except (ValueError, KeyError, TypeError):
            got = None
        self.note(
            kind, "ok" if status == want and got == param else f"status {status} param {got}", data.decode(errors="replace")
        )

    async def huge(self) -> None:
        """A body past --max-body, declared (Content-Length) or streamed (chunked): 413."""
        size = self.rng.choice([MAX_BODY + 1, 4 * MAX_BODY, 2 << 20])
        chunked = self.rng.random() < 0.5
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            payload = b'{"prompt": "' + b"a" * size + b'"}'
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(payload)}"
            writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode())
            try:
                if chunked:
                    for at in range(0, len(payload), 65536):
                        piece = payload[at : at + 65536]
                        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(payload)
                await asyncio.wait_for(writer.drain(), 10)
            except (ConnectionError, asyncio.TimeoutError):
                pass  # the server answered and closed before taking the rest: the answer is still there to read
            line = await asyncio.wait_for(reader.readline(), 10)
            status = int(line.split()[1]) if line else 0
            self.note("huge body", "ok" if status == 413 else f"status {status}")
        except (ConnectionError, asyncio.TimeoutError) as e:
            self.note("huge body", "reset", repr(e))
        finally:
            writer.close()

    async def disconnect(self) -> None:
        """A streamed request abandoned after its first text."""
        reader, writer = await asyncio.open_connection(HOST, self.port)
        body = json.dumps({"prompt": "The", "max_tokens": MAX_LENGTH, "stream": True}).encode()
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            data = b""
            while b"data: {" not in data:
                piece = await asyncio.wait_for(reader.read(4096), 30)
                if not piece:
                    break
                data += piece
            self.note(
                "disconnect mid-stream",
                "ok" if b" 200 " in data[:20] or b" 429 " in data[:20] else "no stream",
                data[:200].decode(errors="replace"),
            )
        except asyncio.TimeoutError:
            self.note("disconnect mid-stream", "timeout")
        finally:
            writer.close()

    async def burst(self) -> None:
        """More requests at once than rows and queue hold: some get 429, the rest their texts."""
        self.in_burst = True
        conns = [Connection(self.port) for _ in range(ROWS_AND_QUEUE + 24)]
        try:
            await asyncio.gather(*(self.valid(c, self.rng.random() < 0.5) for c in conns))
        finally:
            for c in conns:
                c.close()
            self.in_burst = False


async def soak(port: int, pool: list[Valid], duration: float, workers: int, seed: int, server: ServerProcess) -> dict:
    s = Soak(port, pool, random.Random(seed))
    start = time.monotonic()
    deadline = start + duration
    rss: dict[str, int] = {}

    async def worker(i: int) -> None:
        conn = Connection(port)
        try:
            while time.monotonic() < deadline:
                r = s.rng.random()
                try:
                    if r < 0.45:
                        await s.valid(conn, stream=s.rng.random() < 0.5)
                    elif r < 0.75:
                        await s.bad(conn)
                    elif r < 0.82:
                        await s.huge()
                    else:
                        await s.disconnect()
                except (ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
                    s.note("connection", "error", repr(e))
                    conn.close()
        finally:
            conn.close()

    async def bursts() -> None:
        while time.monotonic() < deadline - 5:
            await asyncio.sleep(min(15.0, duration / 4))
            await s.burst()

    async def memory() -> None:
        await asyncio.sleep(min(20.0, duration * 0.2))  # warm-up: allocator pools, import caches, first bursts
        rss["after_warmup_kb"] = rss_kb(server)
        rss["peak_kb"] = rss["after_warmup_kb"]
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            rss["peak_kb"] = max(rss["peak_kb"], rss_kb(server))

    await asyncio.gather(*(worker(i) for i in range(workers)), bursts(), memory())
    rss["end_kb"] = rss_kb(server)
    return {"counts": s.counts, "failures": s.failures, "rss": rss, "seconds": time.monotonic() - start}


def rss_kb(server: ServerProcess) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def metric(port: int, name: str) -> float:
    body = bytearray()

    async def ask() -> None:
        conn = Connection(port)
        await conn.request("/metrics", b"", body.extend, method="GET")
        conn.close()

    asyncio.run(ask())
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="the model to serve (default: a random 2x128 LSTM made here)")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of soak")
    ap.add_argument("--workers", type=int, default=8, help="concurrent clients besides the bursts")
    ap.add_argument("--pool", type=int, default=60, help="distinct valid requests (their texts computed first)")
    ap.add_argument("--quick", action="store_true", help="20 s: checks that it runs")
    ap.add_argument("--json", type=Path, help="write the counts here too")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.pool = min(args.duration, 20.0), min(args.pool, 20)
    text = sample_text()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or make_checkpoint(Path(tmp), size=128)
        pool = valid_pool(ckpt, text, args.pool)
        server = ServerProcess(ckpt, "--dtype", "fp32", *LIMITS)
        try:
            result = asyncio.run(soak(server.port, pool, args.duration, args.workers, 0, server))
            up = server.proc.poll() is None
            deadline = time.monotonic() + 10
            while up and (metric(server.port, "charlm_active_streams") or metric(server.port, "charlm_queued_requests")):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            left = metric(server.port, "charlm_active_streams") + metric(server.port, "charlm_queued_requests") if up else -1
        finally:
            code = server.stop()
    counts: Counter = result["counts"]
    kinds = sorted({k for k, _ in counts})
    total = sum(counts.values())
    bad = sum(n for (k, o), n in counts.items() if o not in ("ok", "429"))
    rss = result["rss"]
    growth = (rss["end_kb"] - rss["after_warmup_kb"]) / rss["after_warmup_kb"]
    passed = up and bad == 0 and left == 0 and growth < 0.10 and code == 0
    print(
        f"charlm serve soak: {result['seconds']:.0f} s, {total} requests, {args.workers} workers + bursts of {ROWS_AND_QUEUE + 24}"
    )
    print("| kind | ok | 429 (in a burst) | other |\n|---|---:|---:|---:|")
    for k in kinds:
        other = sum(n for (kk, o), n in counts.items() if kk == k and o not in ("ok", "429"))
        print(f"| {k} | {counts[(k, 'ok')]} | {counts[(k, '429')]} | {other} |")
    print(f"server up at the end: {up}; rows or queued requests left: {left}; exit status after SIGTERM: {code}")
    print(
        f"resident memory: {rss['after_warmup_kb'] / 1024:.1f} MiB after warm-up, {rss['end_kb'] / 1024:.1f} MiB at the end "
        f"({100 * growth:+.1f}%), peak {rss['peak_kb'] / 1024:.1f} MiB"
    )
    for f in result["failures"][:20]:
        print("  failure:", f)
    print("PASS" if passed else "FAIL")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "counts": {f"{k}: {o}": n for (k, o), n in counts.items()},
                    "rss": rss,
                    "up": up,
                    "left": left,
                    "exit": code,
                    "failures": result["failures"],
                    "passed": passed,
                },
                indent=2,
            )
        )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
