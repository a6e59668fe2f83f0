"""Scheduled sampling against plain training: the same preset and step budget, three schedules x two modes.

    python benchmarks/scheduled_sampling.py [--corpus shakespeare] [--preset demo] [--steps 600]
        [--judges CKPT ...] [--judge-steps 1200] [--runs checkpoints/ss] [--out benchmarks/results/scheduled_sampling]

Trains seven models with `charlm train CORPUS --preset PRESET --dtype fp32 --max-steps STEPS`
(a step budget: the result does not depend on the machine's load): plain teacher forcing, and
`--scheduled-sampling linear | exponential | inverse-sigmoid` each with `--ss-mode model` and
`--ss-mode uniform` (the schedules' default k and floor unless --ss-k / --ss-floor are given).
For each: the teacher-forced test bits/char (`charlm eval --split test`), then free-running
samples (--samples of --length characters after a newline, at temperature 1.0 and 0.8, fixed
seeds) judged two ways: the bits/char that a judge (an ensemble, mean of probabilities, of
independently trained models given with --judges, or trained here: three models of the same
preset with seeds 101-103 and --judge-steps steps each) assigns to the samples, and the share of
repeated 10-grams (per sample: 1 - distinct 10-grams / 10-grams, averaged). Runs already trained
to STEPS are reused, so the series can be stopped and started again. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from charlm import checkpoint
from charlm.data import PreparedData
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.evaluate import evaluate
from charlm.decoding.sampling import processors, sample
from charlm.decoding.scorer import ModelScorer

VARIANTS = [("plain", [])] + [
    (f"{schedule}-{mode}", ["--scheduled-sampling", schedule, "--ss-mode", mode])
    for schedule in ("linear", "exponential", "inverse-sigmoid")
    for mode in ("model", "uniform")
]
TEMPERATURES = (1.0, 0.8)


def train(name: str, flags: list[str], args, steps: int, seed: int | None = None) -> Path:
    out = Path(args.runs) / name
    last = out / "last.safetensors"
    if last.exists() and checkpoint.read_meta(last)["train_state"]["step"] >= steps:
        return last
    command = [
        sys.executable,
        "-m",
        "charlm",
        "train",
        args.corpus,
        "--preset",
        args.preset,
        "--dtype",
        "fp32",
        "--max-steps",
        str(steps),
        "--time-budget",
        "24h",
        "--eval-every",
        str(max(steps // 2, 1)),
        "--out",
        str(out),
        "--overwrite",
        *flags,
        *(["--seed", str(seed)] if seed is not None else []),
    ]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    with open(out.parent / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
    return last


def repeated_share(text: str, n: int = 10) -> float:
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def samples(ckpt_path: Path, temperature: float, args) -> list[str]:
    ckpt = checkpoint.load(ckpt_path)
    scorer = ModelScorer(ckpt.build_model(), ckpt.vocab)
    prime = torch.from_numpy(np.asarray(ckpt.vocab.encode("\n"), dtype=np.int64))
    generator = torch.Generator().manual_seed(1000 + int(temperature * 100))
    ids = sample(scorer, prime, args.length, processors(temperature, None, None), False, generator, args.samples)
    return [ckpt.vocab.decode(row) for row in ids.tolist()]


def judged(judge: Ensemble, texts: list[str]) -> float:
    """The judge's bits/char over all samples, each scored as its own stream after the newline it started from."""
    nll = chars = 0.0
    for text in texts:
        tokens = np.asarray(judge.vocab.encode("\n" + text, "skip"))
        result = evaluate(judge, tokens, chars=len(tokens) - 1)
        nll += result["nll"]
        chars += result["chars"]
    return nll / np.log(2) / chars


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--ss-k", type=float)
    ap.add_argument("--ss-floor", type=float)
    ap.add_argument("--judges", nargs="*")
    ap.add_argument("--judge-steps", type=int)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--runs", default="checkpoints/ss")
    ap.add_argument("--out", default="benchmarks/results/scheduled_sampling")
    ap.add_argument("--train-only", help="comma-separated variants to train, then stop (to train in several processes)")
    args = ap.parse_args()
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    extra = [
        *(["--ss-k", str(args.ss_k)] if args.ss_k else []),
        *(["--ss-floor", str(args.ss_floor)] if args.ss_floor is not None else []),
    ]
    if args.train_only:
        for name, flags in VARIANTS:
            if name in args.train_only.split(","):
                train(name, flags + (extra if flags else []), args, args.steps)
        return
    runs = {name: train(name, flags + (extra if flags else []), args, args.steps) for name, flags in VARIANTS}
    judges = args.judges or [
        str(train(f"judge-{seed}", [], args, args.judge_steps or 2 * args.steps, seed)) for seed in (101, 102, 103)
    ]
    judge = Ensemble([ModelScorer((c := checkpoint.load(p)).build_model(), c.vocab) for p in judges])
    rows = []
    for name, last in runs.items():
        data = PreparedData(checkpoint.read_meta(last)["provenance"]["data_dir"])
        row = {
            "variant": name,
            "test_bpc": evaluate(
                ModelScorer((c := checkpoint.load(last)).build_model(), c.vocab), np.asarray(data.tokens("test"))
            )["bits_per_char"],
        }
        for t in TEMPERATURES:
            texts = samples(last, t, args)
            row[f"judge_bpc_T{t}"] = judged(judge, texts)
            row[f"repeated_10grams_T{t}"] = float(np.mean([repeated_share(s) for s in texts]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "corpus": args.corpus,
        "preset": args.preset,
        "steps": args.steps,
        "judges": judges,
        "samples": args.samples,
        "length": args.length,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")
    head = "| variant | test bits/char | judge bits/char T=1.0 | T=0.8 | repeated 10-grams T=1.0 | T=0.8 |\n|---|---|---|---|---|---|\n"
    lines = [
        f"| {r['variant']} | {r['test_bpc']:.4f} | {r['judge_bpc_T1.0']:.4f} | {r['judge_bpc_T0.8']:.4f} | "
        f"{r['repeated_10grams_T1.0']:.3f} | {r['repeated_10grams_T0.8']:.3f} |"
        for r in rows
    ]
    Path(args.out + ".md").write_text(head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))


if __name__ == "__main__":
    main()
