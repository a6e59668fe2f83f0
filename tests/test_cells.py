"""The cell contract, checked for every registered cell (charlm/cells/): a cell is tested the moment it is registered.

- the fused/fast forward equals the reference written from the equations (layer_step), 1e-5 in fp32;
- single-step decoding equals the whole-window forward, over several windows with the state carried;
- reorder moves states (beams);
- members of one shape stepped together equal member by member (fp32, bf16, int8);
- internals name per-step activations of the right shape, the gates among them.
"""

import pytest
import torch

from charlm.cells import Cell, cell_class, cell_names
from charlm.config import ModelConfig
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.scorer import ModelScorer
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab

VOCAB = Vocab.from_text("abcdefgh\n .,")
CELLS = cell_names()  # the registry, not a hand-written list


def model_for(cell, seed=0, layers=2, rnn_size=32):
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, num_layers=layers, rnn_size=rnn_size, embed_size=16, vocab_size=len(VOCAB))
    return CharRNN(cfg).eval()


def random_state(cell: Cell, batch: int):
    torch.manual_seed(1)
    return tuple(torch.randn_like(s) * 0.5 for s in cell.zero_state(batch))


@pytest.mark.parametrize("cell", CELLS)
def test_fast_forward_equals_the_equations(cell):
    c = cell_class(cell)(16, 32, 3, 0.0).eval()
    x, state = torch.randn(4, 9, 16), random_state(cell_class(cell)(16, 32, 3, 0.0), 4)
    with torch.no_grad():
        fast, fast_state = c(x, state)
        ref, ref_state = Cell.forward(c, x, state)  # the base class: layer_step, step by step
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for a, b in zip(fast_state, ref_state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_internals_name_per_step_activations(cell):
    c = cell_class(cell)(16, 32, 2, 0.0).eval()
    acts, _ = c.internals(torch.randn(3, 7, 16), c.zero_state(3))
    assert "hidden" in acts and set(c.gate_names) <= set(acts)
    assert all(a.shape == (2, 3, 7, 32) for a in acts.values())
    out, _ = c(torch.randn(3, 7, 16), c.zero_state(3))
    for gate in c.gate_names:  # sigmoid gates live in (0, 1)
        assert acts[gate].min() >= 0 and acts[gate].max() <= 1


@pytest.mark.parametrize("cell", CELLS)
def test_inspect_equals_the_equations_and_forward(cell):
    """A cell's own inspect (the fused cells': a kernel per layer, then the equations on all steps
    at once) gives the step-by-step equations' outputs, internals and state, over two windows."""
    torch.manual_seed(3)
    c = cell_class(cell)(16, 32, 2, 0.0).eval()
    state = tuple(0.5 * torch.randn_like(s) for s in c.zero_state(3))
    ref_state = state
    for _ in range(2):
        x = torch.randn(3, 7, 16)
        with torch.no_grad():
            fwd, _ = c(x, state)
        out, acts, state = c.inspect(x, state)
        ref_out, ref_acts, ref_state = Cell.inspect(c, x, ref_state)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(out, fwd, atol=1e-5, rtol=0)
        assert acts.keys() == ref_acts.keys()
        for name in acts:
            torch.testing.assert_close(acts[name], ref_acts[name], atol=1e-5, rtol=0)
        for a, b in zip(state, ref_state):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_single_steps_equal_whole_windows_with_the_state_carried(cell):
    model = model_for(cell)
    scorer = ModelScorer(model, VOCAB)
    ids = torch.randint(0, len(VOCAB), (3, 24))
    state_w, state_s, window_logps, step_logps = scorer.start(3), scorer.start(3), [], []
    for lo in range(0, 24, 8):  # three windows, the state carried from one to the next
        logp, state_w = scorer.score(ids[:, lo : lo + 8], state_w)
        window_logps.append(logp)
    for t in range(24):
        logp, state_s = scorer.step(ids[:, t], state_s)
        step_logps.append(logp)
    torch.testing.assert_close(torch.stack(step_logps, 1), torch.cat(window_logps, 1), atol=1e-5, rtol=0)
    for a, b in zip(state_s, state_w):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_reorder_moves_states(cell):
    scorer = ModelScorer(model_for(cell), VOCAB)
    _, state = scorer.step(torch.tensor([1, 2, 3]), scorer.start(3))
    moved = scorer.reorder(state, torch.tensor([2, 2, 0]))
    for before, after in zip(state, moved):
        assert torch.equal(after[:, 0], before[:, 2]) and torch.equal(after[:, 2], before[:, 0])


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("cell", CELLS)
def test_members_stepped_together_equal_members_one_by_one(cell, dtype):
    members = [ModelScorer(model_for(cell, seed), VOCAB, dtype=dtype) for seed in range(3)]
    together, one_by_one = Ensemble(members, weights=[0.5, 0.3, 0.2]), Ensemble(members, weights=[0.5, 0.3, 0.2])
    one_by_one._stacked = False
    s1, s2 = together.start(2), one_by_one.start(2)
    for t in range(6):
        x = torch.tensor([t % 5, (3 * t) % 7])
        a, s1 = together.step(x, s1)
        b, s2 = one_by_one.step(x, s2)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert together._stacked
    for m1, m2 in zip(s1, s2):
        for a, b in zip(m1, m2):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cells_of_another_class_or_shape_step_one_by_one():
    ens = Ensemble([ModelScorer(model_for("lstm", 0, rnn_size=24), VOCAB), ModelScorer(model_for("lstm", 1, rnn_size=16), VOCAB)])
    ens.step(torch.tensor([1]), ens.start(1))
    assert ens._stacked is False
    if len(CELLS) > 1:
        ens = Ensemble([ModelScorer(model_for(CELLS[0]), VOCAB), ModelScorer(model_for(CELLS[1]), VOCAB)])
        ens.step(torch.tensor([1]), ens.start(1))
        assert ens._stacked is False
