"""The exporter's own check: onnxruntime runs the graph beside charlm's decoder, step for step.

Both carry their own state from zeros through the same ids, several streams at once (so the batch
dimension is checked too). The ids are text the model itself samples (from charlm's log-probs,
temperature 1, a fixed seed): what it will read when it generates. Random ids would drive it into
states no text reaches, where a large model is so sensitive that fp16 weights alone move a log-prob
by 2 (measured, docs/export.md) and the check would say nothing about generation.

Two figures, each with a bound per stored dtype (storage.BOUNDS): the largest |log-prob
difference| over every symbol of every step, and the mean KL divergence from charlm's distribution
to the graph's (the extra nats per symbol that the model's own text costs under the export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from charlm.errors import CharlmError
from charlm.export.step import IDS, LOGPROBS, StateSpec
from charlm.export.storage import BOUNDS

if TYPE_CHECKING:
    import onnxruntime

    from charlm.api import LanguageModel


@dataclass(frozen=True)
class CheckResult:
    """How closely onnxruntime followed charlm over steps x streams, and the bounds it was held to."""

    steps: int
    streams: int
    max_abs_diff: float  # largest |log p_onnx - log p_charlm| over every symbol and step
    mean_kl: float  # mean over steps and streams of KL(p_charlm || p_onnx), nats
    bound: float  # on max_abs_diff
    kl_bound: float  # on mean_kl
    runtime: str  # "onnxruntime X.Y.Z"

    def record(self) -> dict:
        return {
            "steps": self.steps,
            "streams": self.streams,
            "max_abs_diff": self.max_abs_diff,
            "mean_kl": self.mean_kl,
            "bound": self.bound,
            "kl_bound": self.kl_bound,
            "runtime": self.runtime,
            "reference": "charlm's fp32 decoder (LanguageModel.scorer.step)",
            "input": "text the model samples itself",
        }


def session(model: bytes | str, threads: int = 1) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session with the default graph optimisations (what users get), on `threads` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_both(
    sess,
    lm: LanguageModel,
    specs: Sequence[StateSpec],
    first: np.ndarray,
    steps: int,
    choose: Callable[[int, np.ndarray], np.ndarray],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """From ids `first` (B,), `steps` steps of the graph and of charlm, states carried apart; yields
    (onnxruntime's log-probs, charlm's), both (B, V). choose(t, charlm's log-probs) gives the next ids."""
    batch = len(first)
    feeds = {s.input: np.zeros((s.layers, batch, s.size), dtype=np.float32) for s in specs}
    state = lm.scorer.start(batch)
    outputs = [LOGPROBS, *(s.output for s in specs)]
    ids = first.astype(np.int64)
    for t in range(steps):
        got = sess.run(outputs, {IDS: ids, **feeds})
        feeds = {s.input: v for s, v in zip(specs, got[1:])}
        logp, state = lm.scorer.step(torch.from_numpy(ids), state)
        want = logp.numpy()
        yield got[0], want
        ids = choose(t, want).astype(np.int64)


def step_both(sess, lm: LanguageModel, specs: Sequence[StateSpec], ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """run_both over given ids (T, B): the same text read by both."""
    return run_both(sess, lm, specs, ids[0], len(ids), lambda t, _: ids[min(t + 1, len(ids) - 1)])


def self_sampled(seed: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """A choose() that samples each stream's next id from charlm's distribution (inverse CDF, numpy's generator)."""
    rng = np.random.default_rng(seed)

    def choose(_t: int, logp: np.ndarray) -> np.ndarray:
        cdf = np.exp(logp.astype(np.float64)).cumsum(axis=-1)
        u = rng.random(len(logp)) * cdf[:, -1]
        return np.minimum((cdf <= u[:, None]).sum(axis=-1), logp.shape[-1] - 1)

    return choose


def kl(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(p_want || p_got) per row, nats, from log-probs (float64)."""
    want, got = want.astype(np.float64), got.astype(np.float64)
    return (np.exp(want) * (want - got)).sum(axis=-1)


def compare(
    model: bytes, lm: LanguageModel, specs: Sequence[StateSpec], dtype: str, steps: int, streams: int, seed: int = 0
) -> CheckResult:
    """Run the graph and lm side by side on the model's own samples; a CharlmError naming the step if they part by more than the bounds."""
    import onnxruntime as ort

    try:
        sess = session(model)
    except Exception as e:  # onnxruntime's own error types (Fail, InvalidGraph, NotImplemented ...)
        raise CharlmError(f"onnxruntime cannot run the exported graph: {str(e).splitlines()[0][:300]}") from None
    bound, kl_bound = BOUNDS[dtype]
    first = np.random.default_rng(seed).integers(0, len(lm.vocab), size=streams)
    worst, kls = 0.0, []
    for t, (got, want) in enumerate(run_both(sess, lm, specs, first, steps, self_sampled(seed))):
        diff = float(np.max(np.abs(got - want)))
        if not diff <= bound:  # NaN fails too
            raise CharlmError(
                f"the exported graph ({dtype}) parts from charlm at step {t + 1}: log-probs differ by {diff:.3g} "
                f"(allowed {bound:g}); nothing was written"
            )
        worst = max(worst, diff)
        kls.append(kl(want, got))
    mean_kl = float(np.mean(np.concatenate(kls)))
    if not mean_kl <= kl_bound:
        raise CharlmError(
            f"the exported graph ({dtype}) parts from charlm: mean KL divergence {mean_kl:.3g} nats per step "
            f"(allowed {kl_bound:g}); nothing was written"
        )
    return CheckResult(steps, streams, worst, mean_kl, bound, kl_bound, f"onnxruntime {ort.__version__}")
