"""Load on `charlm serve`: aggregate characters/s, time to first character and time per character under 1, 8 and
64 concurrent clients, against the batching server and against `--max-streams 1` (one request at a time, as a
server with one lock around the model), beside the batched decoder's own 64-stream rate without HTTP.

    python benchmarks/serve_load.py                       # a random 2x512 LSTM (speed does not depend on weights)
    python benchmarks/serve_load.py --checkpoint run/best.safetensors --duration 30 --json results.json
    python benchmarks/serve_load.py --quick               # a few seconds per setting: checks that it runs

Each client asks for --length characters after a --prime-length character prompt (streamed), again and again,
for --duration seconds; characters are counted as they arrive within that window. The client is a small
asyncio HTTP/1.1 client on raw sockets (keep-alive, chunked SSE), loopback only: the lighter the load generator,
the less of the 2 cores it takes from the server. The floors (issue 24, on the 2-core dev machine, 2x512):
at 64 clients the server reaches >= 60% of the decoder's own 64-stream rate and >= 3x one-at-a-time; at 8
clients p99 time to first character <= 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


# -- the model and the server --------------------------------------------------------------------
def sample_text(chars: int = 300_000, seed: int = 1) -> str:
    """Lines of words (the test suite's tiny corpus): the prompts are slices of it, so every character is known."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    rng, out, size = random.Random(seed), [], 0
    while size < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:chars]


def make_checkpoint(work: Path, layers: int = 2, size: int = 512) -> Path:
    """A layers x size LSTM trained for one step (random weights: as fast as a trained one)."""
    import charlm

    os.environ["CHARLM_CORPORA_DIR"] = str(work / "corpora")  # the prepare cache stays in the temporary dir
    (work / "text.txt").write_text(sample_text())
    result = charlm.train(
        work / "text.txt",
        work / "run",
        num_layers=layers,
        rnn_size=size,
        embed_size=64,
        batch_size=8,
        seq_length=64,
        max_steps=1,
        dtype="fp32",
        device="cpu",
        progress=False,
        overwrite=True,
    )
    return Path(result.best)


class ServerProcess:
    """`python -m charlm.serve CKPT --port 0 ...` with its URL read from its first line."""

    def __init__(self, ckpt: Path, *flags: str, startup: float = 120.0):
        cmd = [sys.executable, "-m", "charlm.serve", str(ckpt), "--port", "0", "--device", "cpu", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        found = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
                if m:
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(startup):
            self.stop()
            raise RuntimeError(f"the server did not start: {''.join(self.log)}")

    def cpu_seconds(self) -> tuple[float, float]:
        """The server's CPU time so far, (its main thread: the HTTP event loop, its other threads: the model), from /proc."""
        main = other = 0.0
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            try:
                with open(f"/proc/{self.proc.pid}/task/{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # a thread that has just ended
                continue
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if int(task) == self.proc.pid:
                main += seconds
            else:
                other += seconds
        return main, other

    def stop(self, timeout: float = 60.0) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- a small HTTP/1.1 client -----------------------------------------------------------------------
class Connection:
    """One keep-alive connection: POST a JSON body, read the answer (chunked or not), hand over its bytes."""

    def __init__(self, port: int, key: str | None = None):
        self.port = port
        self.auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, body: bytes, on_data, method: str = "POST") -> int:
        """Send one request; on_data(bytes) for each piece of the body as it arrives. Returns the status."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{self.auth}\r\n"
        ).encode()
        reused = self.writer is not None and not self.writer.is_closing()
        if not reused:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None and self.writer is not None
        self.writer.write(head + body)
        line = await self.reader.readline()
        if not line and reused:  # the server closed the idle keep-alive connection first (its timeout): once more, anew
            self.close()
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            self.writer.write(head + body)
            line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("the server closed the connection without an answer")
        status = int(line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                on_data(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
        elif "content-length" in headers:
            on_data(await self.reader.readexactly(int(headers["content-length"])))
        if headers.get("connection") == "close":
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SSE:
    """Counts the characters of a streamed completion as its events arrive (and when the first came)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.chars = 0
        self.first: float | None = None
        self.last: float | None = None
        self.arrivals: list[tuple[float, int]] = []  # (time, characters) per piece
        self.error: str | None = None

    def __call__(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        got = 0
        for event in events:
            if event.startswith(b"data: {"):
                obj = json.loads(event[6:])
                if "error" in obj:
                    self.error = obj["error"]["message"]
                    continue
                got += sum(len(c["text"]) for c in obj["choices"])
        if got:
            if self.first is None:
                self.first = now
            self.last = now
            self.chars += got
            self.arrivals.append((now, got))


# -- the load --------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    clients: int
    seconds: float
    chars: int = 0
    requests: int = 0
    completed: int = 0
    errors: int = 0
    first_char: list[float] = field(default_factory=list)  # seconds, per request that produced text
    per_char: list[float] = field(default_factory=list)  # seconds per character after the first, per completed request
    server_cpu: float = 0.0  # cores the server used on average
    http_cpu: float = 0.0  # of which its main thread (the event loop: HTTP, JSON, SSE)
    client_cpu: float = 0.0  # cores this load generator used on average

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "chars_per_s": round(self.chars / self.seconds),
            "requests": self.requests,
            "completed": self.completed,
            "errors": self.errors,
            "first_char_ms_p50": _ms(pct(self.first_char, 0.5)),
            "first_char_ms_p99": _ms(pct(self.first_char, 0.99)),
            "per_char_ms_p50": _ms(pct(self.per_char, 0.5), 3),
            "per_char_ms_p99": _ms(pct(self.per_char, 0.99), 3),
            "server_cpu_cores": round(self.server_cpu, 2),
            "server_http_thread_cores": round(self.http_cpu, 2),
            "client_cpu_cores": round(self.client_cpu, 2),
        }


def _ms(seconds: float | None, digits: int = 1) -> float | None:
    return None if seconds is None else round(1e3 * seconds, digits)


async def load(
    port: int, clients: int, duration: float, length: int, prime_length: int, text: str, key: str | None, server: ServerProcess
) -> LoadResult:
    """`clients` clients asking for streamed completions, one after another each, for `duration` seconds."""
    result = LoadResult(clients, duration)
    rng = random.Random(clients)
    start = time.perf_counter()
    deadline = start + duration

    async def client(i: int) -> None:
        conn = Connection(port, key)
        k = 0
        try:
            while time.perf_counter() < deadline:
                at = rng.randrange(len(text) - prime_length)
                body = json.dumps(
                    {
                        "prompt": text[at : at + prime_length],
                        "max_tokens": length,
                        "temperature": 0.8,
                        "seed": i * 100_000 + k,
                        "stream": True,
                    }
                ).encode()
                k += 1
                sse = SSE()
                sent = time.perf_counter()
                result.requests += 1
                try:
                    status = await conn.request("/v1/completions", body, sse)
                finally:
                    result.chars += sum(n for t, n in sse.arrivals if t <= deadline)
                    if sse.first is not None:
                        result.first_char.append(sse.first - sent)
                if status != 200 or sse.error:
                    result.errors += 1
                    continue
                result.completed += 1
                if sse.chars > 1 and sse.last is not None and sse.first is not None:
                    result.per_char.append((sse.last - sse.first) / (sse.chars - 1))
        finally:
            conn.close()

    (http0, model0), own0 = server.cpu_seconds(), time.process_time()
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    for t in tasks:  # the requests still open at the deadline: their connections close (the server frees the rows)
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - start
    http1, model1 = server.cpu_seconds()
    result.server_cpu = (http1 + model1 - http0 - model0) / elapsed
    result.http_cpu = (http1 - http0) / elapsed
    result.client_cpu = (time.process_time() - own0) / elapsed
    return result


def server_threads(port: int, key: str | None) -> int:
    got: dict = {}

    async def ask() -> None:
        body = bytearray()
        conn = Connection(port, key)
        await conn.request("/health", b"", body.extend, method="GET")
        conn.close()
        got.update(json.loads(bytes(body)))

    asyncio.run(ask())
    return int(got.get("torch_threads", 0))


# -- the decoder alone -----------------------------------------------------------------------------
def decoder_rate(
    ckpt: Path, dtype: str, threads: int, streams: int, length: int, prime_length: int, text: str, rounds: int = 3
) -> float:
    """Characters/s of lm.generate_many over `streams` primes (the batched decoder through the API, no HTTP)."""
    import torch

    import charlm

    torch.set_num_threads(threads)
    lm = charlm.load(ckpt, device="cpu", dtype=dtype, threads=threads)  # else each call takes the free cores
    rng = random.Random(0)
    primes = [text[a : a + prime_length] for a in (rng.randrange(len(text) - prime_length) for _ in range(streams))]
    lm.generate_many(primes, 20, temperature=0.8, seed=0)  # warm-up
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        lm.generate_many(primes, length, temperature=0.8, seed=r)
        times.append(time.perf_counter() - start)
    return streams * length / statistics.median(times)


# -- the run ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="the model to serve (default: a random 2x512 LSTM made here)")
    ap.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per setting")
    ap.add_argument("--length", type=int, default=500, help="characters each request asks for")
    ap.add_argument("--prime-length", type=int, default=100, help="characters of each prompt")
    ap.add_argument("--dtype", default="fp32", help="the server's --dtype (and the decoder's)")
    ap.add_argument("--flags", default="", help="more `charlm serve` flags for both servers, e.g. '--flush-interval 0.05'")
    ap.add_argument("--skip-one-at-a-time", action="store_true", help="only the batching server")
    ap.add_argument("--quick", action="store_true", help="3 s per setting, one decoder round: checks that it runs")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 3.0)
    clients = [int(c) for c in args.clients.split(",")]
    text = sample_text()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or make_checkpoint(Path(tmp))
        servers = {"batched": ["--max-streams", "64"]}
        if not args.skip_one_at_a_time:
            servers["one at a time"] = ["--max-streams", "1", "--max-n", "1"]
        rounds = 1 if args.quick else 3
        rows: list[dict] = []
        decoder: dict[str, float] = {}
        threads = 0
        for name, flags in servers.items():
            server = ServerProcess(ckpt, "--dtype", args.dtype, "--max-queue", "4096", *flags, *args.flags.split())
            try:
                asyncio.run(load(server.port, 1, 1.0, 50, args.prime_length, text, None, server))  # warm-up
                threads = server_threads(server.port, None)
                if not decoder:  # the decoder alone on the server's model threads, while the server idles: before ...
                    decoder["before"] = decoder_rate(ckpt, args.dtype, threads, 64, args.length, args.prime_length, text, rounds)
                for n in clients:
                    r = asyncio.run(load(server.port, n, args.duration, args.length, args.prime_length, text, None, server))
                    rows.append({"server": name, **r.summary()})
                    print(_row(rows[-1]), file=sys.stderr, flush=True)
            finally:
                code = server.stop()
                if code != 0:
                    print(f"warning: the server exited with {code}: {''.join(server.log[-5:])}", file=sys.stderr)
        # ... and after the load (a drifting machine shows as a gap between the two), and on charlm.threads' choice
        # for batched work (what `charlm bench` and generate_many use on their own).
        decoder["after"] = decoder_rate(ckpt, args.dtype, threads, 64, args.length, args.prime_length, text, rounds)
        from charlm import threads as charlm_threads

        bench_threads = charlm_threads.choose("batch")
        decoder_bench = decoder_rate(ckpt, args.dtype, bench_threads, 64, args.length, args.prime_length, text, rounds)
    decoder_same = (decoder["before"] + decoder["after"]) / 2
    report = {
        "machine": {"cores": os.cpu_count(), "server_torch_threads": threads},
        "dtype": args.dtype,
        "duration_s": args.duration,
        "length": args.length,
        "prime_length": args.prime_length,
        "rows": rows,
        "decoder_64_streams": {
            f"chars_per_s_{threads}_threads (the server's)": round(decoder_same),
            "before": round(decoder["before"]),
            "after": round(decoder["after"]),
            f"chars_per_s_{bench_threads}_threads (charlm.threads' batch choice)": round(decoder_bench),
        },
    }
    report["floors"] = floors(rows, decoder_same, decoder_bench, max(clients))
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def floors(rows: list[dict], decoder_same: float, decoder_bench: float, most: int) -> dict:
    def find(server: str, clients: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["clients"] == clients), None)

    out: dict = {}
    top, single, eight = find("batched", most), find("one at a time", most), find("batched", 8)
    if top:
        out["share_of_decoder_same_threads"] = round(top["chars_per_s"] / decoder_same, 3)
        out["share_of_decoder_bench_threads"] = round(top["chars_per_s"] / decoder_bench, 3)
    if top and single:
        out["batched_over_one_at_a_time"] = round(top["chars_per_s"] / max(single["chars_per_s"], 1), 2)
    if eight:
        out["first_char_p99_ms_8_clients"] = eight["first_char_ms_p99"]
    return out


def _row(r: dict) -> str:
    return (
        f"| {r['server']} | {r['clients']} | {r['chars_per_s']:,} | {r['first_char_ms_p50']} | {r['first_char_ms_p99']} | "
        f"{r['per_char_ms_p50']} | {r['per_char_ms_p99']} | {r['server_cpu_cores']} ({r['server_http_thread_cores']}) | "
        f"{r['client_cpu_cores']} | "
        f"{r['completed']}/{r['requests']} | {r['errors']} |"
    )


def table(report: dict) -> str:
    d = report["decoder_64_streams"]
    lines = [
        f"charlm serve under load: {report['dtype']}, {report['length']} characters after a {report['prime_length']}-character "
        f"prompt, {report['duration_s']} s per setting, {report['machine']['cores']} cores, server model threads "
        f"{report['machine']['server_torch_threads']}",
        "",
        "| server | clients | chars/s | first char p50 ms | p99 ms | per char p50 ms | p99 ms | server CPU, cores (HTTP thread) | "
        "client CPU | completed/sent | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(r) for r in report["rows"]]
    lines += [
        "",
        "decoder alone, 64 streams (lm.generate_many): " + ", ".join(f"{k} {v:,}" for k, v in d.items()),
        "floors: " + ", ".join(f"{k} {v}" for k, v in report["floors"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
