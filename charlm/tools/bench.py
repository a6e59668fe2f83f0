"""Measure this machine: the matrix-product roof, training and generation throughput, prepare speed.

Every comparison is measured in the same run, alternating the contenders in rounds (ABBA order)
and reporting medians, because shared machines are noisy.
"""

from __future__ import annotations

import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm import machine, threads
from charlm.allocator import keep_freed_memory
from charlm.config import DECODE_DTYPES, ModelConfig, TrainConfig
from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.decoding.beam import beam_search
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.sampling import processors, sample
from charlm.decoding.scorer import ModelScorer
from charlm.devices import USES, autocast_for, cpu_has_bf16, resolve_dtype
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab
from charlm.training.trainer import Trainer

SYMBOLS = string.ascii_letters + string.digits + " .\n"  # 65 symbols, like tiny Shakespeare


def dtypes_here() -> tuple[str, ...]:
    """The training dtypes this CPU runs: bf16 only with native support (without it oneDNN's bf16
    LSTM fails and a bf16 product is emulated, ~100x slower than fp32: nothing worth timing)."""
    return ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)


def median_time(fn: Callable[[], object], rounds: int, warmup: int = 1) -> float:
    """Median wall time of fn over `rounds` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(runners: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Each runner's wall time per round, the runners in ABBA order, after one untimed call each.

    A runner that returns a float has timed itself (a child process leaves out its start-up, and
    warms up on its own: warmup=False)."""
    for fn in runners.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for _ in range(rounds):
        order.reverse()
        for name in order:
            start = time.perf_counter()
            own = runners[name]()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return times


def interleaved_rates(
    runners: dict[str, Callable[[], object]], work: float, rounds: int, warmup: bool = True
) -> dict[str, float]:
    """work / median time of each runner (interleaved_times)."""
    return {k: work / statistics.median(v) for k, v in interleaved_times(runners, rounds, warmup).items()}


# -- the roof -------------------------------------------------------------------------------
def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, rounds: int = 5, onednn: bool = False, work: float = 2e9) -> float:
    """GFLOP/s of an (m, k) @ (k, n) product: torch.mm (MKL for fp32 here), or oneDNN's linear kernel."""
    reps = max(1, int(work / (2 * m * k * n)))  # about `work` FLOP per timed call
    if onednn:
        from torch.utils import mkldnn as mkldnn_utils

        layer = mkldnn_utils.to_mkldnn(nn.Linear(k, n, bias=False), dtype)
        x = torch.randn(m, k).to_mkldnn(dtype)
        product = lambda: layer(x)  # noqa: E731
    else:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        product = lambda: torch.mm(a, b)  # noqa: E731

    def run():
        for _ in range(reps):
            product()

    return 2 * m * k * n * reps / median_time(run, rounds) / 1e9


def roof(quick: bool = False) -> dict:
    """Per dtype, the best rate among torch.mm and oneDNN's kernel, on a large square product and an
    LSTM-shaped one (6400x512 @ 512x2048, one window's worth of rows). The kernels differ a lot on
    some CPUs (on AMD, MKL's fp32 GEMM runs at well under half of oneDNN's), so both are tried."""
    rounds = 3 if quick else 5
    out = {}
    for name in dtypes_here():
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        detail = {}
        for shape in ((2048, 2048, 2048), (6400, 512, 2048)):
            for onednn in (False, True):
                key = f"{'onednn' if onednn else 'mm'} {shape[0]}x{shape[1]}x{shape[2]}"
                try:
                    detail[key] = round(matmul_gflops(*shape, dtype, rounds, onednn, work=5e8 if quick else 2e9), 1)
                except (RuntimeError, AttributeError):  # a build without oneDNN (or its bf16 path)
                    continue
        out[f"{name}_gflops"] = max(detail.values())
        out[f"{name}_detail"] = detail
    return out


# -- training -------------------------------------------------------------------------------
class PlainLSTM(nn.Module):
    """The reference: nn.Embedding -> nn.LSTM -> nn.Linear, as people write it by hand."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def plain_step(data: PreparedData, layers: int, hidden: int, embed: int, batch: int, seq: int, dtype: str = "fp32"):
    """One step of the plain loop per call: slice, forward, loss, backward, clip, Adam."""
    torch.manual_seed(0)
    V = len(data.vocab)
    model = PlainLSTM(V, embed, hidden, layers)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    tokens = np.asarray(data.tokens("train"))
    L = (len(tokens) - 1) // batch
    xs = torch.from_numpy(tokens[: batch * L].astype(np.int64)).view(batch, L)
    ys = torch.from_numpy(tokens[1 : batch * L + 1].astype(np.int64)).view(batch, L)
    pos = {"k": 0, "state": None}
    cpu = torch.device("cpu")

    def step():
        k = pos["k"]
        if (k + 1) * seq > L:
            k, pos["state"] = 0, None
        x, y = xs[:, k * seq : (k + 1) * seq], ys[:, k * seq : (k + 1) * seq]
        with autocast_for(cpu, dtype):
            logits, state = model(x, pos["state"])
        loss = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
        pos["state"] = tuple(s.detach() for s in state)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        pos["k"] = k + 1

    return step


def charlm_step(data: PreparedData, layers: int, hidden: int, embed: int, batch: int, seq: int, dtype: str, out_dir: Path):
    """One charlm Trainer step per call, on the same data."""
    model_cfg = ModelConfig(cell="lstm", num_layers=layers, rnn_size=hidden, embed_size=embed)
    trainer = Trainer(model_cfg, TrainConfig(batch_size=batch, seq_length=seq, device="cpu", dtype=dtype), data, out_dir)
    loss_sum = torch.zeros(())
    return lambda: trainer.step(loss_sum)


def step_elsewhere(
    kind: str,
    data: PreparedData,
    layers: int,
    hidden: int,
    embed: int,
    batch: int,
    seq: int,
    steps: int,
    allocator: str = "charlm",
):
    """Training steps timed in a child process of their own: `kind` is "plain" (the hand-written
    loop, fp32) or a charlm dtype ("fp32", "bf16"); `allocator` is "charlm" or "system" (glibc's
    defaults, as a hand-written script runs).

    Why a process each: several models trained in one process share one heap, and their
    different allocation patterns fragment it, so which contender pays for page faults depends
    on the company it keeps. Each call starts a child that builds the step, takes up to five
    untimed steps (while the heap grows), then times `steps` steps and prints the seconds; the
    call returns them (the child's start-up is not counted)."""
    args = [kind, str(data.dir), layers, hidden, embed, batch, seq, steps, torch.get_num_threads()]
    code = f"from charlm.tools.bench import time_steps; time_steps(*{args!r})"
    env = {**os.environ, "CHARLM_MALLOC": allocator}

    def run() -> float:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    return run


def time_steps(
    kind: str, data_dir: str, layers: int, hidden: int, embed: int, batch: int, seq: int, steps: int, threads: int
) -> None:
    """The child process of a timed training run (see above): builds the step, warms up, prints the seconds of `steps` steps."""
    keep_freed_memory()  # unless CHARLM_MALLOC=system
    torch.set_num_threads(threads)
    data = PreparedData(Path(data_dir))
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "plain":
            step = plain_step(data, layers, hidden, embed, batch, seq)
        else:
            step = charlm_step(data, layers, hidden, embed, batch, seq, kind, Path(tmp))
        for _ in range(max(2, min(steps, 5))):  # untimed: the first steps grow the heap (page faults)
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        print(time.perf_counter() - start)


def synthetic_data(directory: Path, chars: int = 2_000_000) -> PreparedData:
    """A prepared dir of random text over 65 symbols (speed does not depend on the text)."""
    src = directory / "synthetic.txt"
    rng = np.random.default_rng(0)
    src.write_text("".join(rng.choice(list(SYMBOLS), chars)))
    prep.prepare([src], directory / "prepared")
    return PreparedData(directory / "prepared")


def flops_per_char(layers: int, hidden: int, embed: int, vocab: int = 65) -> float:
    """Training FLOPs per character: 6 x (recurrent + head) parameters (forward 2, backward 4)."""
    recurrent = sum(4 * hidden * ((embed if k == 0 else hidden) + hidden + 2) for k in range(layers))
    return 6.0 * (recurrent + vocab * (hidden + 1))


def training(data: PreparedData, layers=2, hidden=512, embed=64, batch=64, seq=100, steps=10, rounds=6) -> dict:
    """chars/s of the plain fp32 loop, charlm fp32 and charlm bf16, measured side by side.

    Each contender runs in a process of its own (see step_elsewhere), in ABBA-ordered rounds. The
    plain loop runs twice: with charlm's allocator settings (the reference) and with glibc's
    defaults, as a hand-written script runs."""
    args = (data, layers, hidden, embed, batch, seq, steps)
    runners = {
        "reference_fp32": step_elsewhere("plain", *args),
        "reference_fp32_default_allocator": step_elsewhere("plain", *args, allocator="system"),
        **{dtype: step_elsewhere(dtype, *args) for dtype in dtypes_here()},
    }
    rates = interleaved_rates(runners, steps * batch * seq, rounds, warmup=False)
    fpc = flops_per_char(layers, hidden, embed)
    return {k: {"chars_per_s": round(v), "gflops": round(v * fpc / 1e9, 1)} for k, v in rates.items()}


# -- generation -----------------------------------------------------------------------------
def random_scorer(layers: int, hidden: int, seed: int, dtype: str = "fp32") -> ModelScorer:
    torch.manual_seed(seed)
    vocab = Vocab.from_text(SYMBOLS)
    model = CharRNN(ModelConfig(num_layers=layers, rnn_size=hidden, embed_size=64, vocab_size=len(vocab)))
    return ModelScorer(model.eval(), vocab, dtype=dtype)


def generation(layers=2, hidden=512, length=1000, rounds=5, dtype="fp32") -> dict:
    """Sampling (1 and 64 streams), beam search (width 1 and 10), an ensemble of 3, in one decoding dtype."""
    one = random_scorer(layers, hidden, 0, dtype)
    three = Ensemble([one, random_scorer(layers, hidden, 1, dtype), random_scorer(layers, hidden, 2, dtype)])
    prime = torch.tensor(one.vocab.encode("The "))
    chain = processors(0.8)

    def sampler(scorer, streams, n):
        return lambda: sample(scorer, prime, n, chain, generator=torch.Generator().manual_seed(0), num_samples=streams)

    beam_len = max(length // 4, 10)
    t_single = median_time(sampler(one, 1, length), rounds)
    t_batch = median_time(sampler(one, 64, length // 2), rounds)
    t_ens = median_time(sampler(three, 1, length), rounds)
    t_ens_batch = median_time(sampler(three, 64, length // 2), rounds)
    t_beam1 = median_time(lambda: beam_search(one, prime, beam_len, beam_width=1), rounds) / beam_len
    t_beam10 = median_time(lambda: beam_search(one, prime, beam_len, beam_width=10), rounds) / beam_len
    return {
        "sample": {
            "single": {"chars_per_s": round(length / t_single)},
            "batch64": {"chars_per_s": round(64 * (length // 2) / t_batch)},
        },
        "beam": {
            "width1_ms_per_char": round(1e3 * t_beam1, 3),
            "width10_ms_per_char": round(1e3 * t_beam10, 3),
            "width10_over_width1": round(t_beam10 / t_beam1, 2),
        },
        "ensemble": {
            "three_chars_per_s": round(length / t_ens),
            "three_over_one": round(t_ens / t_single, 2),
            # 64 streams: the products, not the weight reads, set the pace, so cache size matters less
            "three_batch64_chars_per_s": round(64 * (length // 2) / t_ens_batch),
            "three_over_one_batch64": round(t_ens_batch / t_batch, 2),
        },
    }


# -- prepare --------------------------------------------------------------------------------
def prepare_speed(megabytes: int = 64, work_dir=None) -> dict:
    """MB/s of charlm prepare on a synthetic ASCII text of the given size (both passes, disk included)."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        src = Path(tmp) / "text.txt"
        rng = np.random.default_rng(0)
        block = "".join(rng.choice(list(SYMBOLS), 1 << 20)).encode()
        with open(src, "wb") as f:
            for _ in range(megabytes):
                f.write(block)
        start = time.perf_counter()
        prep.prepare([src], Path(tmp) / "out")
        seconds = time.perf_counter() - start
    return {"mb_per_s": round(megabytes * (1 << 20) / 1e6 / seconds, 1), "megabytes": megabytes}


def auto_against_measured(report: dict) -> dict:
    """For each use, what `--dtype auto` picks on this CPU and which dtype measured fastest in this run
    (eval is fp32 by rule, not by speed). A pick that is not the fastest is worth a look."""
    measured = {
        "train": {d: report["train"][d]["chars_per_s"] for d in dtypes_here()},
        "step": {d: g["sample"]["single"]["chars_per_s"] for d, g in report["generation"].items()},
        "batch": {d: g["sample"]["batch64"]["chars_per_s"] for d, g in report["generation"].items()},
        "ensemble": {d: g["ensemble"]["three_chars_per_s"] for d, g in report["generation"].items()},
    }
    out = {}
    for use in USES:
        pick = resolve_dtype(torch.device("cpu"), use)
        rates = measured.get(use)
        out[use] = {"auto": pick, "fastest": max(rates, key=lambda d: rates[d]) if rates else None, "chars_per_s": rates}
    return out


def run_all(
    quick: bool = False,
    layers=2,
    hidden=512,
    batch=64,
    seq=100,
    progress: Callable[[str], None] | None = None,
    num_threads: int | None = None,
) -> dict:
    """Everything `charlm bench` reports, as one nested dict. It runs on the threads charlm would use
    for batched work now (threads.py: the free cores, or `num_threads` / --threads)."""
    say = progress or (lambda s: None)
    allocator = "charlm (freed memory kept)" if keep_freed_memory() else "system default"
    threads.apply("batch", num_threads)
    report = {
        "machine": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "allocator": allocator,
            "line": machine.describe(),
        }
    }
    say("matrix-product roof")
    report["roof"] = roof(quick)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp), 600_000 if quick else 2_000_000)
        say(f"training {layers}x{hidden} LSTM, batch {batch}, seq {seq}")
        report["train"] = training(
            data, layers, hidden, 64, batch, seq, steps=3 if quick else 10, rounds=1 if quick else 6
        )  # each contender a child process per round
    for k, v in report["train"].items():
        peak = report["roof"]["bf16_gflops" if k == "bf16" else "fp32_gflops"]
        v["fraction_of_roof"] = round(v["gflops"] / peak, 2)
    for suffix, ref_key in (("reference", "reference_fp32"), ("default_allocator_reference", "reference_fp32_default_allocator")):
        ref = report["train"][ref_key]["chars_per_s"]
        for dtype in dtypes_here():
            report["train"][f"{dtype}_over_{suffix}"] = round(report["train"][dtype]["chars_per_s"] / ref, 3)
    report["train"]["model"] = f"{layers}x{hidden} LSTM, embed 64, batch {batch}, seq {seq}"
    gen = {}
    for dtype in [d for d in DECODE_DTYPES if d == "fp32" or "bf16" in dtypes_here()]:  # int8 runs its prime in bf16
        say(f"generation ({dtype} products)")
        gen[dtype] = generation(layers, hidden, length=300 if quick else 1000, rounds=2 if quick else 5, dtype=dtype)
    # Sampling: the faster of fp32 and bf16 for each case, named (which one wins depends on the CPU);
    # int8 (approximate weights) is reported on its own.
    report["sample"] = {}
    for case in ("single", "batch64"):
        dtype = max(dtypes_here(), key=lambda d: gen[d]["sample"][case]["chars_per_s"])
        report["sample"][case] = {**gen[dtype]["sample"][case], "dtype": dtype}
    if "int8" in gen:
        report["sample_int8"] = gen["int8"]["sample"]
    report["generation"] = gen
    report["auto"] = auto_against_measured(report)
    report["beam"] = {d: g["beam"] for d, g in gen.items()}
    report["ensemble"] = {d: g["ensemble"] for d, g in gen.items()}
    say("prepare")
    report["prepare"] = prepare_speed(16 if quick else 128)
    return report
