"""One stream at the speed the memory allows: the native decoding step (cells/native.py), the single-stream
draw, evaluation of one long text in mended rows (decoding/evaluate.py) and dynamic evaluation's fused
update, each held to the plain equations or to the PyTorch code it replaces, for every registered cell."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from charlm.cells import cell_names, native
from charlm.config import ModelConfig
from charlm.decoding import dynamic
from charlm.decoding import evaluate as ev
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.sampling import Temperature, draw, draw_one, processors, sample, temperature_only
from charlm.decoding.scorer import ModelScorer
from charlm.decoding.stepper import Stepper
from charlm.decoding.streams import Streams
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab

VOCAB = Vocab.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
CELLS = cell_names()
needs_native = pytest.mark.skipif(native.library() is None, reason=f"no native library here: {native.why_not()}")


def model_for(cell: str, seed: int = 0, layers: int = 3, rnn_size: int = 40, embed_size: int = 12) -> CharRNN:
    """A width that is no multiple of 16 or 64 and three layers: every padding and layer path runs."""
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, num_layers=layers, rnn_size=rnn_size, embed_size=embed_size, vocab_size=len(VOCAB))
    return CharRNN(cfg).eval()


def text_ids(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "."]
    text = " ".join(rng.choice(words) for _ in range(n // 3 + 10))[:n]
    return np.asarray(VOCAB.encode(text), dtype=np.int64)


# -- the step ------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("rows", [1, 3])
def test_native_step_is_the_equations(cell, rows):
    """fp32 log-probs of the native step = the whole-window forward (the cell's equations) to 1e-5."""
    model = model_for(cell)
    scorer = ModelScorer(model, VOCAB)
    assert scorer.stepper.native is not None
    ids = torch.randint(0, len(VOCAB), (rows, 25), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.log_softmax(model(ids)[0], dim=-1)  # (B, T, V)
    state = scorer.start(rows)
    for t in range(ids.shape[1]):
        logp, state = scorer.step(ids[:, t], state)
        torch.testing.assert_close(logp, expected[:, t], rtol=0, atol=1e-5)
    _, final = model(ids, model.init_state(rows))
    for got, want in zip(state, final):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@needs_native
@pytest.mark.parametrize("cell", CELLS)
def test_native_step_matches_the_torch_decoder_in_every_dtype(cell):
    """The native step and the cell's PyTorch decoder (what many streams and GPUs run) agree: fp32 to 1e-5,
    bf16 and int8 within their rounding (int8 reads 16-bit activations: closer to fp32 than the old path)."""
    model = model_for(cell, rnn_size=48)
    ids = torch.randint(0, len(VOCAB), (2, 20), generator=torch.Generator().manual_seed(2))
    exact = Stepper([model], "fp32")
    for dtype, tol in (("fp32", 1e-5), ("bf16", 0.05), ("int8", 0.05)):
        stepper = Stepper([model], dtype)
        s_nat = s_torch = s_exact = tuple(s.unsqueeze(0) for s in model.init_state(2))
        for t in range(ids.shape[1]):
            a, s_nat = stepper.native(ids[:, t], s_nat, log_probs=True)
            with torch.inference_mode():
                b, s_torch = stepper(torch.cat([ids[:, t]] * 9), tuple(s.repeat(1, 1, 9, 1) for s in s_torch), log_probs=True)
            b, s_torch = b[:, :2], tuple(s[:, :, :2].contiguous() for s in s_torch)  # 18 rows > MAX_ROWS: the PyTorch path
            c, s_exact = exact.native(ids[:, t], s_exact, log_probs=True)
            assert (a - b).abs().max() < tol, (dtype, t)
            assert (a - c).abs().max() < (1e-5 if dtype == "fp32" else 0.05), (dtype, t)


@needs_native
def test_ensemble_members_step_together_natively():
    """M members of one shape in one native call = each member alone."""
    models = [model_for("lstm", seed=s) for s in (0, 1)]
    stacked = Stepper(models, "fp32")
    alone = [Stepper([m], "fp32") for m in models]
    ids = torch.tensor([3, 7])
    state = tuple(torch.randn(2, 3, 2, 40) for _ in range(2))
    logits, new = stacked(ids, state)
    for m, single in enumerate(alone):
        one, one_new = single(ids, tuple(s[m : m + 1] for s in state))
        torch.testing.assert_close(logits[m], one[0])
        for a, b in zip(new, one_new):
            torch.testing.assert_close(a[m], b[0])


@needs_native
def test_native_step_leaves_its_input_state_alone_and_refuses_a_bad_id():
    scorer = ModelScorer(model_for("gru"), VOCAB)
    state = tuple(torch.randn_like(s) for s in scorer.start(1))
    before = tuple(s.clone() for s in state)
    scorer.step(torch.tensor([1]), state)
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    with pytest.raises(IndexError):
        scorer.step(torch.tensor([len(VOCAB)]), state)


@needs_native
def test_int8_native_product_is_the_integer_arithmetic():
    """int8 weights (one scale per row) times 16-bit activations (one scale per row), summed exactly."""
    torch.manual_seed(0)
    w, x = torch.randn(70, 45), torch.randn(3, 45)
    packed = native.pack(w, "int8")
    y = torch.empty(3, 70)
    scratch = torch.empty(1 << 16, dtype=torch.uint8)
    native.library().cl_matvec(
        ctypes.byref(packed.mat), 3, x.data_ptr(), 45, 45, None, 0, 0, None, 0, y.data_ptr(), 70, scratch.data_ptr(), 1
    )
    q, scale = native.int8_rows(w)
    sx = x.abs().amax(dim=1, keepdim=True) / 32767
    xq = torch.round(x / sx).clamp(-32767, 32767)
    expected = (xq.double() @ q.double().t()) * sx.double() * scale.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)


def test_the_portable_kernels_match_the_native_ones(tmp_path):
    """The library built without -march=native (no AVX-512: the plain C loops) computes what the AVX-512 one
    does: fp32 and bf16 to rounding, int8 exactly (integer sums)."""
    lib = native.library()
    if lib is None:
        pytest.skip(f"no native library here: {native.why_not()}")
    src, so = tmp_path / "k.c", tmp_path / "k.so"
    src.write_text(native.SOURCE)
    cc = shutil.which("cc") or shutil.which("gcc")
    run = cc and subprocess.run(
        [cc, "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-o", str(so), str(src), "-lm"], capture_output=True
    )
    if not run or run.returncode:
        pytest.skip("cannot build the portable library here")
    plain = native._bind(ctypes.CDLL(str(so)))
    assert plain.cl_features() & 7 == 0  # none of the AVX-512 paths
    torch.manual_seed(0)
    w, x = torch.randn(130, 72), torch.randn(5, 72)
    for dtype, tol in (("fp32", 1e-5), ("bf16", 1e-5), ("int8", 1e-6)):
        p = native.pack(w, dtype)
        outs = []
        for library in (lib, plain):
            y = torch.empty(5, 130)
            scratch = torch.empty(1 << 16, dtype=torch.uint8)
            library.cl_matvec(
                ctypes.byref(p.mat), 5, x.data_ptr(), 72, 72, None, 0, 0, None, 0, y.data_ptr(), 130, scratch.data_ptr(), 1
            )
            outs.append(y)
        torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)


# -- sampling ------------------------------------------------------------------------------------
def test_draw_one_is_draw():
    """The one-row draw picks what draw() picks from the same uniform (a uniform within float rounding of a
    boundary may go either way: none of these is)."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(300):
        logits = torch.randn(1, 30, generator=g) * 3
        u = float(torch.rand(1, generator=g, dtype=torch.float64))
        for t in (1.0, 0.7):
            cdf = torch.softmax(logits.double() / t, dim=-1).cumsum(dim=-1)
            if (cdf - u * cdf[0, -1]).abs().min() < 1e-5:
                continue  # on a boundary to within rounding
            want = int(draw(Temperature(t)(logits), torch.tensor([u], dtype=torch.float64))[0])
            assert draw_one(logits[0].contiguous(), t, u) == want
            checked += 1
    assert checked > 500


def test_temperature_only_sees_through_no_op_processors():
    assert temperature_only(processors(0.8), 30) == 0.8
    assert temperature_only(processors(1.0, top_k=30, top_p=1.0), 30) == 1.0
    assert temperature_only(processors(1.0, top_k=5), 30) is None
    assert temperature_only(processors(1.0, top_p=0.9), 30) is None


def _generate(model: CharRNN, seed: int, greedy: bool = False, **settings) -> str:
    streams = Streams(ModelScorer(model, VOCAB))
    streams.add("the ", 120, seed=seed, greedy=greedy, **settings)
    return "".join(e.text for e in streams.run())


@needs_native
@pytest.mark.parametrize("cell", CELLS)
def test_sampled_text_is_the_pytorch_paths(cell, monkeypatch):
    """fp32: the text a seed gives through the native step and draw = through PyTorch's kernels (the old code)."""
    model = model_for(cell)
    fast = [_generate(model, s, **kw) for s in (1, 2) for kw in ({}, {"temperature": 0.7}, {"top_k": 5}, {"greedy": True})]
    monkeypatch.setenv(native.ENV_VAR, "0")
    slow = [_generate(model, s, **kw) for s in (1, 2) for kw in ({}, {"temperature": 0.7}, {"top_k": 5}, {"greedy": True})]
    assert fast == slow


@needs_native
def test_sample_one_stream_is_the_pytorch_path(monkeypatch):
    scorer = ModelScorer(model_for("lstm"), VOCAB)
    prime = torch.from_numpy(text_ids(10))
    fast = sample(scorer, prime, 100, processors(0.9), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv(native.ENV_VAR, "0")
    slow = sample(ModelScorer(scorer.model, VOCAB), prime, 100, processors(0.9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(fast, slow)


def test_without_the_library_everything_runs_on_pytorch(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "0")
    scorer = ModelScorer(model_for("lstm"), VOCAB)
    assert scorer.stepper.native is None and native.library() is None and native.why_not()
    assert len(_generate(scorer.model, 1)) == 120


# -- evaluation of one long text -----------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_rows_score_the_one_stream(cell):
    """A text cut into rows and mended scores what the single stream scores: bits/char to 1e-6, each token to 1e-5."""
    model = model_for(cell, layers=2, rnn_size=32)
    scorer = ModelScorer(model, VOCAB)
    tokens = text_ids(3000)
    one, rec_one = {}, []
    one = ev.evaluate(scorer, tokens, rows=1, record=rec_one)
    rec_rows = []
    rows = ev.evaluate(scorer, tokens, rows=6, record=rec_rows)
    assert rows["tokens"] == one["tokens"] == len(tokens) - 1
    assert abs(rows["bits_per_char"] - one["bits_per_char"]) < 1e-6
    torch.testing.assert_close(torch.cat(rec_rows, dim=-1), torch.cat(rec_one, dim=-1), rtol=0, atol=1e-5)
    assert ev.exact_rows(scorer, tokens, 6) is not None  # really in rows, not sent back to the single stream


def test_rows_that_never_agree_fall_back_to_the_single_stream(monkeypatch):
    scorer = ModelScorer(model_for("lstm", layers=2, rnn_size=32), VOCAB)
    tokens = text_ids(3000)
    monkeypatch.setattr(ev, "_rows_agree", lambda a, b, sat: torch.zeros(ev._tensors(a)[0].shape[1], dtype=torch.bool))
    assert ev.exact_rows(scorer, tokens, 6) is None
    assert ev.evaluate(scorer, tokens, rows=6)["nll"] == ev.evaluate(scorer, tokens, rows=1)["nll"]


def test_rows_mend_an_lstm_counter_unit():
    """A cell state that never forgets (forget gate ~1) keeps counting: two runs started apart never hold the
    same count, but beyond |c| = 9.5 tanh(c) is 1 in both, so the rows agree and score the one stream."""
    model = model_for("lstm", layers=1, rnn_size=16)
    with torch.no_grad():  # unit 0: forget and input gates open, candidate +1: c grows by 1 a step
        H = 16
        for block, bias in ((0, 30.0), (1, 30.0), (2, 30.0)):
            model.rnn.bias_ih_l0[block * H] = bias
            model.rnn.weight_hh_l0[block * H].zero_()
            model.rnn.weight_ih_l0[block * H].zero_()
    scorer = ModelScorer(model, VOCAB)
    tokens = text_ids(3000)
    assert ev.exact_rows(scorer, tokens, 5) is not None
    assert abs(ev.evaluate(scorer, tokens, rows=5)["bits_per_char"] - ev.evaluate(scorer, tokens, rows=1)["bits_per_char"]) < 1e-6


def test_ensemble_scores_in_rows_too():
    members = [ModelScorer(model_for("gru", seed=s, layers=2, rnn_size=24), VOCAB) for s in (0, 1)]
    ens = Ensemble(members)
    tokens = text_ids(2500)
    assert ev.row_splittable(ens)
    assert abs(ev.evaluate(ens, tokens, rows=4)["bits_per_char"] - ev.evaluate(ens, tokens, rows=1)["bits_per_char"]) < 1e-6


def test_rows_are_chosen_only_for_long_texts():
    scorer = ModelScorer(model_for("rnn", layers=1, rnn_size=16), VOCAB)
    assert ev.exact_rows(scorer, text_ids(500)) is None  # too short: one stream
    assert not ev.row_splittable(ModelScorer(scorer.model, VOCAB, dtype="bf16"))


# -- dynamic evaluation --------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("update", ["sgd", "rms"])
def test_fused_dynamic_update_is_bit_for_bit_the_tensor_code(update, monkeypatch):
    tokens = text_ids(1200)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv(native.ENV_VAR, flag)
        model = model_for("lstm", layers=2, rnn_size=32)
        mean_sq = [torch.rand_like(p) * 1e-3 for p in model.parameters()] if update == "rms" else None
        settings = dynamic.Settings(update, 0.05 if update == "sgd" else 1e-4, 0.02, 50)
        record, _ = dynamic.dynamic_evaluate([dynamic.Adapter(model, settings, mean_sq)], tokens)
        results.append((record["nll"], [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert math.isfinite(results[0][0])
