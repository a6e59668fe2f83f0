"""A prime runs through the whole-window forward pass in 4,096-symbol windows (scorer.run_prime): the same
state, distribution and first sampled symbol as stepping it one symbol at a time (the old way), for
every cell; and a 10 MB prime costs what one window costs in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_text

from charlm.cells import BUILTIN_CELLS
from charlm.config import ModelConfig
from charlm.decoding import sampling
from charlm.decoding.scorer import PRIME_CHUNK, ModelScorer, run_prime
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab


class SteppedPrime:
    """A scorer whose whole-window pass is the old way: one scorer.step per symbol, the log-probs stacked.
    Through it, run_prime and sampling.sample behave exactly as the code before windows did."""

    def __init__(self, inner: ModelScorer):
        self.inner = inner
        self.vocab = inner.vocab

    def start(self, batch_size):
        return self.inner.start(batch_size)

    def step(self, ids, state):
        return self.inner.step(ids, state)

    def reorder(self, state, index):
        return self.inner.reorder(state, index)

    def score(self, ids, state):
        out = []
        for t in range(ids.shape[1]):
            logp, state = self.inner.step(ids[:, t], state)
            out.append(logp)
        return torch.stack(out, dim=1), state  # (B, T, V)


def scorer_for(cell: str, vocab: Vocab) -> ModelScorer:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, num_layers=2, rnn_size=32, embed_size=16, vocab_size=len(vocab), dropout=0.0))
    return ModelScorer(model, vocab, "fp32")


@pytest.mark.parametrize("cell", BUILTIN_CELLS)
def test_a_windowed_prime_equals_stepping_it(cell):
    text = make_text(2 * PRIME_CHUNK + 1500, seed=4)  # across two window boundaries
    vocab = Vocab("char", sorted({ord(c) for c in text}))
    prime = torch.as_tensor(vocab.encode(text), dtype=torch.long)
    windowed, stepped = scorer_for(cell, vocab), SteppedPrime(scorer_for(cell, vocab))

    logp_w, state_w = run_prime(windowed, prime)
    logp_s, state_s = run_prime(stepped, prime, chunk=len(prime))
    torch.testing.assert_close(logp_w, logp_s, atol=2e-4, rtol=1e-4)
    assert len(state_w) == len(state_s)
    for a, b in zip(state_w, state_s):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)

    # The first sampled symbol: greedy, and drawn at several seeds (the same generator, the same rule).
    for greedy in (True, False):
        for seed in range(1 if greedy else 12):
            first = [
                sampling.sample(s, prime, 1, greedy=greedy, generator=torch.Generator().manual_seed(seed))[0, 0].item()
                for s in (windowed, stepped)
            ]
            assert first[0] == first[1], (greedy, seed)


def test_a_10_mb_prime_peaks_under_1_gb(tmp_path, trained):
    """Memory is bounded by the window, not the prime (it was 10 GB for this prime on a 1x32 model)."""
    prime = tmp_path / "prime.txt"
    block = make_text(100_000, seed=2)
    prime.write_text(block * 100)  # 10 MB
    probe = (
        "import json, resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "print(json.dumps({'code': r.returncode, 'stderr': r.stderr[-2000:],"
        " 'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    cmd = [
        sys.executable,
        "-c",
        probe,
        sys.executable,
        "-m",
        "charlm",
        "--threads",
        "1",
        "sample",
        str(trained / "best.safetensors"),
        "--prime-file",
        str(prime),
        "--unknown",
        "skip",
        "--length",
        "20",
        "--seed",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["code"] == 0, r["stderr"]
    assert r["peak_mb"] < 1024, r
