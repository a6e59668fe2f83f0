"""Shared fixtures: tiny corpora made in tmp_path, tiny models trained in seconds."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import ModelConfig, TrainConfig
from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.training.trainer import Trainer

# Small models for CLI tests: seconds per run.
FAST = ["--rnn-size", "32", "--embed-size", "16", "--batch-size", "4", "--seq-length", "16", "--device", "cpu"]
_runner = CliRunner()


def run(*args):
    """One charlm command through CliRunner (stdout and stderr kept apart)."""
    return _runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, pattern):
    """The bad-input contract: exit code 1, exactly one line on stderr ("error: ..."), no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert re.search(pattern, lines[0]), lines[0]


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def make_text(n_chars: int = 20000, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


@pytest.fixture(autouse=True)
def isolated_corpora(tmp_path, monkeypatch):
    """Every test gets its own corpora dir (registry + cache), never the checkout's."""
    d = tmp_path / "corpora"
    d.mkdir()
    monkeypatch.setenv("CHARLM_CORPORA_DIR", str(d))
    monkeypatch.delenv("CHARLM_CORPUS_MIRROR", raising=False)
    monkeypatch.setenv("CHARLM_THREADS", "1")  # tests share 2 cores with each other: no test follows the free cores
    torch.set_num_threads(1)
    return d


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "tiny.txt"
    p.write_text(make_text())
    return p


@pytest.fixture
def prepared(tmp_path, text_file) -> PreparedData:
    out = tmp_path / "prepared"
    prep.prepare([text_file], out)
    return PreparedData(out)


def small_configs(cell: str = "lstm", **train) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(cell=cell, num_layers=2, rnn_size=32, embed_size=16, dropout=0.0)
    options = dict(batch_size=4, seq_length=16, lr=3e-3, eval_every=1000, log_every=1000, device="cpu", seed=0)
    options.update(train)
    return model, TrainConfig(**options)


def train_small(prepared: PreparedData, out: Path, cell: str = "lstm", **train) -> Trainer:
    model_cfg, train_cfg = small_configs(cell, **train)
    if train_cfg.max_steps is None and train_cfg.time_budget is None:
        train_cfg.max_steps = 20
    trainer = Trainer(model_cfg, train_cfg, prepared, out)
    trainer.run()
    return trainer


@pytest.fixture
def trained(tmp_path, prepared) -> Path:
    """A run dir with best/last checkpoints of a tiny LSTM."""
    out = tmp_path / "run"
    train_small(prepared, out, max_steps=30)
    return out
