"""Fine-tuning across vocabularies, measured: Paul Graham's essays after N minutes of training from scratch
against N minutes of fine-tuning a Shakespeare model (whose vocabulary lacks some of the essays'
characters: it grows), and how much of Shakespeare the fine-tuned model forgets.

    python benchmarks/finetune.py --base-minutes 10 --minutes 1,3,10 --out /tmp/finetune
    python benchmarks/finetune.py --base RUN/last.safetensors --steps-per-minute 157 --minutes 1,3

Every run uses the same model size and settings (the shakespeare-cpu preset's), one after another
(never two at once: on 2 cores they would slow each other 10-20x). --steps-per-minute turns each
budget into a step count (N minutes = N x that many steps, the rate measured on an idle machine),
so that a machine slowed by other work trains every run as far as an idle one would; --base
reuses a Shakespeare model trained already (e.g. the preset's 10-minute run). Figures are bits per character
on each corpus's test split (the last 5% of the file). Writes a markdown table to stdout and to
OUT/finetune.md, with the CPU and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import charlm
from charlm import machine


def train(corpus: str, out: Path, minutes: float, steps_per_minute: float | None, **options) -> dict:
    """One run, or the finished one already in `out` (so an interrupted benchmark resumes where it was)."""
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    budget = (
        {"time_budget": minutes * 60}
        if steps_per_minute is None
        else {"max_steps": max(1, round(minutes * steps_per_minute)), "time_budget": 24 * 3600}
    )
    result = charlm.train(corpus, out=out, preset="shakespeare-cpu", overwrite=True, progress=False, **budget, **options)
    record = {
        "last": str(result.last),
        "data_dir": str(result.data_dir),
        "step": result.step,
        "seconds": time.perf_counter() - start,
    }
    done.write_text(json.dumps(record))
    return record


def test_bpc(checkpoint: str, data_dir: str | None = None) -> float:
    lm = charlm.load(checkpoint, device="cpu", dtype="fp32")
    return lm.score(split="test", data=data_dir).bits_per_char


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-minutes", type=float, default=10.0, help="Shakespeare training for the base model")
    ap.add_argument("--minutes", default="1,3,10", help="N: the budgets compared, comma-separated")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the preset's)")
    ap.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="every run's dropout (default 0.1, the figures' in docs/results.md; the preset now says 0.3)",
    )
    ap.add_argument(
        "--steps-per-minute", type=float, default=None, help="budgets as steps at this idle rate (default: wall time)"
    )
    ap.add_argument(
        "--base", default=None, help="a Shakespeare checkpoint (last.safetensors) to start from, instead of training one"
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/charlm-finetune"))
    args = ap.parse_args()
    budgets = [float(m) for m in args.minutes.split(",")]
    spm = args.steps_per_minute
    if args.base:
        meta = charlm.load(args.base, device="cpu", dtype="fp32").info[0]
        base = {"last": args.base, "data_dir": meta["provenance"]["data_dir"], "step": meta["train_state"]["step"]}
    else:
        base = train("shakespeare", args.out / "base-shakespeare", args.base_minutes, spm)
    shk_data = base["data_dir"]
    rows = []
    base_shk = test_bpc(base["last"])
    for n in budgets:
        scratch = train("paulgraham", args.out / f"scratch-{n:g}m", n, spm, dropout=args.dropout)
        tuned = train(
            "paulgraham",
            args.out / f"finetune-{n:g}m",
            n,
            spm,
            init_from=base["last"],
            dropout=args.dropout,
            **({"lr": args.lr} if args.lr else {}),
        )
        rows.append(
            (
                n,
                test_bpc(scratch["last"]),
                test_bpc(tuned["last"]),
                test_bpc(tuned["last"], shk_data),
                scratch["step"],
                tuned["step"],
            )
        )
        print(f"N={n:g} min: scratch {rows[-1][1]:.4f}, fine-tuned {rows[-1][2]:.4f} bits/char on Paul Graham", file=sys.stderr)
    lines = [
        f"CPU: {machine.cpu_model()}; {time.strftime('%Y-%m-%d')}; `python benchmarks/finetune.py {' '.join(sys.argv[1:])}`; "
        f"preset shakespeare-cpu with dropout {args.dropout:g} for every run"
        + (f", N minutes = {spm:g} x N steps" if spm else ""),
        "",
        f"Base: Shakespeare, {args.base_minutes:g} minutes ({base['step']:,} steps): Shakespeare test {base_shk:.4f} bits/char",
        "",
        "| N (minutes) | Paul Graham test, from scratch | Paul Graham test, fine-tuned | gain | Shakespeare test after fine-tuning (before: "
        f"{base_shk:.4f}) | steps scratch / fine-tuned |",
        "|---|---|---|---|---|---|",
    ]
    for n, scratch, tuned, shk_after, s1, s2 in rows:
        lines.append(f"| {n:g} | {scratch:.4f} | {tuned:.4f} | {scratch - tuned:+.4f} | {shk_after:.4f} | {s1:,} / {s2:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "finetune.md").write_text(text)


if __name__ == "__main__":
    main()
