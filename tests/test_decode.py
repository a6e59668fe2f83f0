import math

import numpy as np
import pytest
import torch

from charlm import CharlmError, checkpoint
from charlm.cells.products import Int8Product
from charlm.config import ModelConfig
from charlm.decoding.evaluate import evaluate
from charlm.decoding.sampling import TopK, TopP, processors, sample
from charlm.decoding.scorer import ModelScorer
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab

VOCAB = Vocab.from_text("abcdefgh\n ")


def model_for(cell, seed=0, layers=2, rnn_size=24):
    torch.manual_seed(seed)
    return CharRNN(ModelConfig(cell=cell, num_layers=layers, rnn_size=rnn_size, embed_size=8, vocab_size=len(VOCAB))).eval()


def test_int8_product_is_the_dequantized_product_and_close_to_fp32():
    torch.manual_seed(0)
    w, x = torch.randn(64, 48), torch.randn(3, 48)
    p = Int8Product(w)
    dequantized = p.q.float() * p.scale.float()[:, None]
    assert p.q.dtype == torch.int8 and (dequantized - w).abs().max() <= w.abs().amax(1).max() / 127  # one level
    got = p(x).float()
    assert torch.allclose(got, x.to(torch.bfloat16).float() @ dequantized.t(), rtol=2e-2, atol=2e-2)
    assert (got - x @ w.t()).norm() / (x @ w.t()).norm() < 0.02


def test_int8_product_without_the_kernel_gives_the_same_numbers(monkeypatch):
    torch.manual_seed(0)
    w, x = torch.randn(64, 48), torch.randn(3, 48)
    fast = Int8Product(w)
    expected = fast(x).float()

    def missing(*args):
        raise NotImplementedError

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", missing)
    slow = Int8Product(w)
    assert slow.fallback is not None and fast.fallback is None
    assert torch.allclose(slow(x).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_int8_cells_stay_close_to_fp32(cell):
    model = model_for(cell, rnn_size=32)  # a width the int8 kernel takes
    ids = torch.randint(0, len(VOCAB), (2, 30))
    exact, approx = ModelScorer(model, VOCAB), ModelScorer(model, VOCAB, dtype="int8")
    s1 = s2 = model.init_state(2)
    for t in range(30):
        la, s1 = exact.step(ids[:, t], s1)
        lb, s2 = approx.step(ids[:, t], s2)
        assert (la - lb).abs().max() < 0.05, t
    assert not torch.equal(la, lb)  # it really ran on rounded weights
    assert approx.stepper.w_head[0].fallback is None  # through the int8 kernel


def test_int8_kernel_only_for_widths_it_handles():
    """The CPU kernel crashes for an input width that is not a multiple of 16: those use the fallback."""
    assert Int8Product(torch.randn(8, 24)).fallback is not None
    odd = Int8Product(torch.randn(8, 24))
    assert odd(torch.randn(2, 24)).shape == (2, 8)


def test_uniform_model_scores_log2_v():
    model = model_for("lstm")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), 500)
    result = evaluate(ModelScorer(model, VOCAB), tokens)
    assert result["bits_per_char"] == pytest.approx(math.log2(len(VOCAB)), abs=1e-6)
    assert result["chars"] == 499 and result["perplexity"] == pytest.approx(len(VOCAB), rel=1e-5)


def test_streaming_eval_equals_one_forward():
    model = model_for("gru")
    tokens = np.random.default_rng(1).integers(0, len(VOCAB), 300)
    got = evaluate(ModelScorer(model, VOCAB), tokens, window=7)["nll"]
    with torch.no_grad():
        logits, _ = model(torch.tensor(tokens[None, :-1]))
    want = float(torch.nn.functional.cross_entropy(logits[0], torch.tensor(tokens[1:]), reduction="sum"))
    assert got == pytest.approx(want, rel=1e-5)


def draw(scorer, seed, **kw):
    chain = processors(kw.pop("temperature", 1.0), kw.pop("top_k", None), kw.pop("top_p", None))
    g = torch.Generator().manual_seed(seed)
    return sample(scorer, torch.tensor([0, 1]), 60, chain, generator=g, **kw)


def test_seed_reproduces_and_differs_across_seeds():
    scorer = ModelScorer(model_for("lstm"), VOCAB)
    assert torch.equal(draw(scorer, 5), draw(scorer, 5))
    assert not torch.equal(draw(scorer, 5), draw(scorer, 6))


def test_greedy_equals_top_k_1():
    scorer = ModelScorer(model_for("lstm"), VOCAB)
    greedy = draw(scorer, 0, greedy=True)
    assert torch.equal(greedy, draw(scorer, 123, top_k=1))
    assert torch.equal(greedy, draw(scorer, 9, top_k=1, temperature=2.5))


def test_batched_samples_match_single_streams_when_greedy():
    scorer = ModelScorer(model_for("rnn"), VOCAB)
    many = draw(scorer, 0, greedy=True, num_samples=4)
    assert all(torch.equal(row, many[0]) for row in many)


def test_processors_validate_and_filter():
    with pytest.raises(CharlmError, match="--greedy"):
        processors(temperature=-1.0)
    with pytest.raises(CharlmError):
        processors(temperature=0.0)
    with pytest.raises(CharlmError):
        TopK(0)
    with pytest.raises(CharlmError):
        TopP(1.5)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(TopK(2)(logits)).tolist() == [[False, False, True, True]]
    assert torch.isinf(TopP(0.7)(logits)).tolist() == [[False, False, True, True]]
    assert torch.isinf(TopP(0.5)(logits)).tolist() == [[False, True, True, True]]


def test_sampling_works_from_a_checkpoint(trained):
    ckpt = checkpoint.load(trained / "best.safetensors")
    scorer = ModelScorer(ckpt.build_model(), ckpt.vocab)
    out = sample(scorer, torch.tensor(ckpt.vocab.encode("The ")), 40, processors(0.8), generator=torch.Generator().manual_seed(0))
    text = ckpt.vocab.decode(out[0].tolist())
    assert len(text) == 40
