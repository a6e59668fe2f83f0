"""Beam search and ensembles: invariants that break if the machinery is wrong."""

import itertools
import math

import numpy as np
import pytest
import torch

from charlm import CharlmError
from charlm.config import ModelConfig
from charlm.decoding.beam import beam_search
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.evaluate import evaluate
from charlm.decoding.sampling import sample
from charlm.decoding.scorer import ModelScorer
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab

VOCAB = Vocab.from_text("abcdefgh\n ")


def scorer(cell="lstm", seed=0, vocab=VOCAB, size=24, layers=2):
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(cell=cell, num_layers=layers, rnn_size=size, embed_size=8, vocab_size=len(vocab)))
    with torch.no_grad():  # sharper distributions than at initialisation, so that search matters
        model.head.weight.mul_(8)
    return ModelScorer(model.eval(), vocab)


def sequence_logprob(s, prime, ids):
    state = s.start(1)
    logp, state = s.score(prime.view(1, -1), state)
    total, logp = 0.0, logp[:, -1]
    for t, i in enumerate(ids):
        total += float(logp[0, i])
        if t + 1 < len(ids):
            logp, state = s.step(torch.tensor([i]), state)
    return total


def test_beam_width_1_is_greedy():
    s = scorer()
    prime = torch.tensor(VOCAB.encode("abc"))
    greedy = sample(s, prime, 30, greedy=True)[0].tolist()
    ((ids, score),) = beam_search(s, prime, 30, beam_width=1)
    assert ids == greedy
    assert score == pytest.approx(sequence_logprob(s, prime, ids), abs=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_wide_beam_equals_exhaustive_search(cell):
    vocab = Vocab.from_text("xyz")
    s = scorer(cell, seed=3, vocab=vocab, size=16)
    prime = torch.tensor([0])
    length = 5
    best = max(itertools.product(range(3), repeat=length), key=lambda ids: sequence_logprob(s, prime, ids))
    best_score = sequence_logprob(s, prime, best)
    ((ids, score),) = beam_search(s, prime, length, beam_width=3**length)
    assert ids == list(best)
    assert score == pytest.approx(best_score, abs=1e-4)
    # n-best are the top of the exhaustive ranking, in order.
    ranked = sorted((sequence_logprob(s, prime, c) for c in itertools.product(range(3), repeat=length)), reverse=True)
    got = [sc for _, sc in beam_search(s, prime, length, beam_width=3**length, n_best=5)]
    assert got == pytest.approx(ranked[:5], abs=1e-4)


def test_stop_at_ends_hypotheses():
    s = scorer(seed=1)
    stop = torch.tensor(VOCAB.encode("\n"))
    for ids, _ in beam_search(s, torch.tensor([0]), 40, beam_width=4, n_best=4, stop_at=stop):
        if VOCAB.encode("\n")[0] in ids:
            assert ids.index(VOCAB.encode("\n")[0]) == len(ids) - 1


def test_beam_validates_arguments():
    s = scorer()
    with pytest.raises(CharlmError, match="beam-width"):
        beam_search(s, torch.tensor([0]), 5, beam_width=0)
    with pytest.raises(CharlmError, match="n-best"):
        beam_search(s, torch.tensor([0]), 5, beam_width=2, n_best=3)


def test_reorder_really_moves_states():
    s = scorer()
    state = s.start(3)
    _, state = s.score(torch.tensor([[0, 1], [2, 3], [4, 5]]), state)
    moved = s.reorder(state, torch.tensor([2, 0, 0]))
    for a, b in zip(state, moved):
        assert torch.equal(b[:, 0], a[:, 2]) and torch.equal(b[:, 1], a[:, 0]) and torch.equal(b[:, 2], a[:, 0])
        assert not torch.equal(a, b)
    ens = Ensemble([s, scorer("gru", seed=2)])
    st = ens.start(2)
    _, st = ens.score(torch.tensor([[0, 1], [5, 6]]), st)
    swapped = ens.reorder(st, torch.tensor([1, 0]))
    for member, member_swapped in zip(st, swapped):
        for a, b in zip(member, member_swapped):
            assert torch.equal(b[:, 0], a[:, 1]) and not torch.equal(a, b)


def ids_batch():
    return torch.tensor(np.random.default_rng(0).integers(0, len(VOCAB), (2, 20)))


def test_one_model_ensemble_equals_the_model():
    s = scorer()
    a, _ = s.score(ids_batch(), s.start(2))
    b, _ = Ensemble([s]).score(ids_batch(), Ensemble([s]).start(2))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("combine", ["mean", "geometric"])
def test_two_copies_equal_one(combine):
    s = scorer()
    ens = Ensemble([s, s], combine=combine)
    a, _ = s.score(ids_batch(), s.start(2))
    b, _ = ens.score(ids_batch(), ens.start(2))
    assert torch.allclose(a, b, atol=1e-5)
    x = torch.tensor([1, 2])
    sa, _ = s.step(x, s.start(2))
    sb, _ = ens.step(x, ens.start(2))
    assert torch.allclose(sa, sb, atol=1e-5)


@pytest.mark.parametrize("combine", ["mean", "geometric"])
def test_ensemble_log_probs_normalise(combine):
    ens = Ensemble([scorer("lstm", 0), scorer("gru", 1), scorer("rnn", 2)], weights=[0.5, 0.3, 0.2], combine=combine)
    logp, _ = ens.score(ids_batch(), ens.start(2))
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 20), atol=1e-5)


def test_weighted_mean_matches_hand_computation():
    a, b = scorer("lstm", 0), scorer("gru", 1)
    ens = Ensemble([a, b], weights=[3, 1])
    x = torch.tensor([[4]])
    pa = a.score(x, a.start(1))[0].exp()[0, 0]
    pb = b.score(x, b.start(1))[0].exp()[0, 0]
    pe = ens.score(x, ens.start(1))[0].exp()[0, 0]
    assert torch.allclose(pe, 0.75 * pa + 0.25 * pb, atol=1e-6)
    geo = Ensemble([a, b], weights=[3, 1], combine="geometric").score(x, ens.start(1))[0].exp()[0, 0]
    unnorm = pa**0.75 * pb**0.25
    assert torch.allclose(geo, unnorm / unnorm.sum(), atol=1e-6)


def test_mean_of_vanishing_probabilities_stays_finite():
    """A symbol every member gives less than 1e-38 (exp would underflow) keeps a finite, exact log-probability."""
    ens = Ensemble([scorer("lstm", 0), scorer("gru", 1)], weights=[3, 1])
    logps = [torch.tensor([[0.0, -200.0, -300.0]]), torch.tensor([[-1e-3, -7.0, -250.0]])]
    got = ens.combine_logprobs(torch.stack(logps))
    want = torch.logsumexp(torch.stack(logps) + torch.tensor([0.75, 0.25]).log().view(2, 1, 1), dim=0)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)


def test_lstm_gru_ensemble_samples_beams_and_evaluates():
    ens = Ensemble([scorer("lstm", 0, size=24), scorer("gru", 1, size=16, layers=1)])
    out = sample(ens, torch.tensor([0, 1]), 20, generator=torch.Generator().manual_seed(0), num_samples=3)
    assert out.shape == (3, 20)
    assert len(beam_search(ens, torch.tensor([0]), 10, beam_width=4, n_best=2)) == 2
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), 200)
    assert math.isfinite(evaluate(ens, tokens)["bits_per_char"])


def test_ensemble_errors():
    other = Vocab.from_text("abcdefgh\n!")
    assert len(Ensemble([scorer(), scorer(vocab=other)]).vocab) == len(VOCAB) + 1  # the union: '!' added
    with pytest.raises(CharlmError, match="geometric"):
        Ensemble([scorer(), scorer(vocab=other)], combine="geometric")
    with pytest.raises(CharlmError, match="2 value.*3 model"):
        Ensemble([scorer(), scorer(), scorer()], weights=[1, 2])
    for bad in ([1, 0], [1, -2], [1, float("nan")]):
        with pytest.raises(CharlmError, match="positive"):
            Ensemble([scorer(), scorer()], weights=bad)
    with pytest.raises(CharlmError, match="combine"):
        Ensemble([scorer()], combine="max")
