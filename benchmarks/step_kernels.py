"""Before/after for the single-step decoding kernel, measured side by side in one run.

    python benchmarks/step_kernels.py [--old PATH_TO_OLD_cells.py]

Compares, on a 2x512 LSTM, batch 1 (or --batch N): nn.LSTM called once per character (the naive
path), an older single-step kernel given with --old (e.g. the first one: two products per layer,
PyTorch gate order; or the one before oneDNN-packed weights: git show d3007bc:charlm/cells.py),
and the current one, in fp32 and bf16. Medians of ABBA-ordered rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from charlm.config import ModelConfig
from charlm.decoding.stepper import Stepper
from charlm.devices import cpu_has_bf16
from charlm.model import CharRNN


def per_step_ms(fn, steps: int = 300, rounds: int = 5) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--old", help="an older charlm/cells.py to compare, in fp32 and bf16 (e.g. from git show 9866693:charlm/cells.py)"
    )
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(num_layers=2, rnn_size=512, embed_size=64, vocab_size=65)).eval()
    ids = torch.zeros(args.batch, dtype=torch.long)
    state = model.init_state(args.batch)
    kernels = {}
    dtypes = ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)  # emulated bf16 is ~100x slower: nothing to learn

    def naive():
        model(ids.view(-1, 1), state)

    kernels["nn.LSTM per character"] = naive
    if args.old:
        spec = importlib.util.spec_from_file_location("old_cells", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        for dtype in dtypes:
            old_step = old.Stepper(model, dtype)
            kernels[f"--old Stepper ({dtype})"] = (lambda s: lambda: s(ids, state))(old_step)
    one = tuple(s.unsqueeze(0) for s in state)  # the current Stepper steps M models at once: here M = 1
    for dtype in dtypes:
        step = Stepper([model], dtype)
        kernels[f"current Stepper ({dtype})"] = (lambda s: lambda: s(ids, one))(step)
    with torch.inference_mode():
        results = {name: [] for name in kernels}
        order = list(kernels)
        for _ in range(3):
            order.reverse()
            for name in order:
                results[name].append(per_step_ms(kernels[name]))
    base = statistics.median(results["nn.LSTM per character"])
    print(f"2x512 LSTM, batch {args.batch}, {torch.get_num_threads()} threads: ms per step (median), speed-up over nn.LSTM")
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"  {name:<26} {ms:7.3f} ms  {base / ms:5.2f}x  ({1e3 / ms * args.batch:,.0f} chars/s)")


if __name__ == "__main__":
    main()
