"""Memory read bandwidth, and the weight-reading roof of one decoding step in each dtype's product kernel:
what bounds single-stream sampling.

    python benchmarks/bandwidth.py                      # 2x512 LSTM, vocabulary 65, 1 thread
    python benchmarks/bandwidth.py --threads 2 --rnn-size 1024

A one-stream step of an L x H LSTM multiplies one row by every weight matrix once: layer 0's
recurrent matrix (4H x H; its input product is a table lookup), each layer above's [W_ih W_hh]
(4H x 2H) and the head (V x H). The roof is those products alone, one after another in a loop (the
weights stream through the caches as in a real step), in each dtype's kernel:

- `native`: charlm's packed kernels (charlm/cells/native.py: fp32 FMA, bf16 dot products, int8 VNNI);
- `torch`: what the PyTorch path uses (oneDNN's packed linear for fp32/bf16, _weight_int8pack_mm for int8).

chars/s at the roof = 1 / (time of a step's products). `roof()` is imported by benchmarks/one_stream.py.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import torch


def read_bandwidth(nbytes: int, rounds: int = 7) -> float:
    """GB/s of one sum over a float32 buffer of nbytes (median of rounds), warmed."""
    a = torch.randn(max(nbytes // 4, 1024))
    for _ in range(3):
        a.sum()
    reps = max(1, int(2e8 // max(nbytes, 1)))
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            a.sum()
        ts.append((time.perf_counter() - t) / reps)
    return a.numel() * 4 / statistics.median(ts) / 1e9


def step_matrices(layers: int, hidden: int, vocab: int, embed: int = 64) -> list[tuple[int, int]]:
    """(out, in) of the products one LSTM decoding step multiplies one row by."""
    shapes = [(4 * hidden, hidden)] + [(4 * hidden, 2 * hidden)] * (layers - 1)
    return shapes + [(vocab, hidden)]


def _runners(shapes: list[tuple[int, int]], dtype: str, kernel: str):
    torch.manual_seed(0)
    ws = [torch.randn(o, i) / i**0.5 for o, i in shapes]
    if kernel == "native":
        from charlm.cells import native

        lib = native.library()
        if lib is None:
            return None, 0
        packed = [native.pack(w, dtype) for w in ws]
        xs = [torch.randn(1, i) for _, i in shapes]
        ys = [torch.empty(1, o) for o, _ in shapes]
        scratch = torch.empty(1 << 20, dtype=torch.uint8)
        calls = [(ctypes.byref(p.mat), x.data_ptr(), x.shape[1], y.data_ptr(), y.shape[1]) for p, x, y in zip(packed, xs, ys)]

        keep = (packed, xs, ys, scratch)  # the library reads their memory: alive as long as run

        def run(keep=keep):
            n = torch.get_num_threads()
            for mat, x, i, y, o in calls:
                lib.cl_matvec(mat, 1, x, i, i, None, 0, 0, None, 0, y, o, scratch.data_ptr(), n)

        return run, sum(p.nbytes for p in packed)
    from charlm.cells.products import product

    prods = [product(w, dtype) for w in ws]
    xs = [torch.randn(1, i, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16) for _, i in shapes]

    def run():
        for p, x in zip(prods, xs):
            p(x)

    per = {"fp32": 4, "bf16": 2, "int8": 1}[dtype]
    return run, sum(o * i * per for o, i in shapes)


def roof(
    layers: int = 2,
    hidden: int = 512,
    vocab: int = 65,
    dtype: str = "fp32",
    kernel: str = "native",
    seconds: float = 1.0,
    rounds: int = 7,
) -> dict:
    """The step's products alone in a loop: {'us_per_step', 'chars_per_s', 'weight_bytes', 'gb_per_s'} (None without the kernel)."""
    run, nbytes = _runners(step_matrices(layers, hidden, vocab), dtype, kernel)
    if run is None:
        return {"us_per_step": None, "chars_per_s": None, "weight_bytes": 0, "gb_per_s": None}
    with torch.inference_mode():
        for _ in range(20):
            run()
        t = time.perf_counter()
        n = 0
        while time.perf_counter() - t < seconds / rounds or n < 5:
            run()
            n += 1
        ts = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n):
                run()
            ts.append((time.perf_counter() - t) / n)
    step = statistics.median(ts)
    return {
        "us_per_step": round(step * 1e6, 1),
        "chars_per_s": round(1 / step),
        "weight_bytes": nbytes,
        "gb_per_s": round(nbytes / step / 1e9, 1),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rnn-size", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = step_matrices(args.num_layers, args.rnn_size, args.vocab)
    fp32_bytes = sum(o * i * 4 for o, i in shapes)
    report: dict = {
        "threads": args.threads,
        "model": f"{args.num_layers}x{args.rnn_size} LSTM, vocabulary {args.vocab}",
        "read_gb_per_s": {
            "256MB (DRAM)": round(read_bandwidth(256 << 20), 1),
            "the fp32 weights' size": round(read_bandwidth(fp32_bytes), 1),
        },
        "roof": {},
    }
    for dtype in ("fp32", "bf16", "int8"):
        for kernel in ("native", "torch"):
            report["roof"][f"{dtype} {kernel}"] = roof(args.num_layers, args.rnn_size, args.vocab, dtype, kernel)
    if args.json:
        print(json.dumps(report))
        return report
    print(f"{report['model']}, {args.threads} thread(s), torch {torch.__version__}")
    for what, v in report["read_gb_per_s"].items():
        print(f"  read bandwidth, sum over {what}: {v} GB/s")
    print(f"  {'kernel':<14} {'weights':>9} {'us/step':>9} {'GB/s':>7} {'chars/s at the roof':>20}")
    for name, r in report["roof"].items():
        if r["us_per_step"] is None:
            print(f"  {name:<14} (not available here)")
            continue
        print(f"  {name:<14} {r['weight_bytes'] / 1e6:>7.1f}MB {r['us_per_step']:>9} {r['gb_per_s']:>7} {r['chars_per_s']:>20,}")
    return report


if __name__ == "__main__":
    main()
