"""Where the time goes: PyTorch profiler tables of one training step and one sampling step (issue 7).

    python benchmarks/profile_steps.py [--steps 5] [--rows 12] > profile.txt

A 2x512 LSTM (embed 64, 65 symbols), batch 64 x sequence 100, the same synthetic data as
`charlm bench`. Profiles, after a few warm-up steps:
  1. charlm's training step (Trainer.step) in fp32 and in bf16 (autocast), --steps steps each;
  2. one single-stream decoding step (ModelScorer.step, fp32 and bf16 products), 200 steps each.
Prints, for each, the profiler's table of operators sorted by self CPU time: which kernels run
(e.g. mkldnn_rnn_layer in bf16 or not) and what share of the step they take.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from charlm.tools.bench import charlm_step, random_scorer, synthetic_data


def table(prof, rows: int) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="training steps profiled per dtype")
    ap.add_argument("--rows", type=int, default=12, help="operators shown per table")
    args = ap.parse_args(argv)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; 2x512 LSTM, embed 64, batch 64, seq 100\n")
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp), chars=1_000_000)
        for dtype in ("fp32", "bf16"):
            step = charlm_step(data, 2, 512, 64, 64, 100, dtype, Path(tmp) / dtype)
            for _ in range(3):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step()
            print(f"## training step, {dtype} ({args.steps} steps; times are totals over them)\n")
            print(table(prof, args.rows))
            sys.stdout.flush()
    for dtype in ("fp32", "bf16"):
        scorer = random_scorer(2, 512, 0, dtype)
        state = scorer.start(1)
        ids = torch.zeros(1, dtype=torch.long)
        for _ in range(50):
            _, state = scorer.step(ids, state)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(200):
                _, state = scorer.step(ids, state)
        print(f"## sampling step, one stream, {dtype} products (200 steps; totals)\n")
        print(table(prof, args.rows))


if __name__ == "__main__":
    main()
