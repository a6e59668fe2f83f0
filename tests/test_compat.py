"""Checkpoints written by an earlier charlm (tests/data/compat, commit 5d3e997) still load and score the same."""

import json
from pathlib import Path

import pytest
import torch

from charlm import checkpoint
from charlm.decoding.scorer import ModelScorer

COMPAT = Path(__file__).parent / "data" / "compat"
EXPECTED = json.loads((COMPAT / "expected.json").read_text())


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_old_checkpoint_scores_the_same(cell):
    ckpt = checkpoint.load(COMPAT / f"{cell}.safetensors")
    assert ckpt.meta["model"]["cell"] == cell
    scorer = ModelScorer(ckpt.build_model(), ckpt.vocab)
    ids = torch.from_numpy(ckpt.vocab.encode(EXPECTED["text"])).view(1, -1)
    logp, _ = scorer.score(ids, scorer.start(1))  # (1, T, V)
    got = logp[0, :-1].gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, torch.tensor(EXPECTED[cell]), atol=1e-6, rtol=0)
