"""A checkpoint is checked before it is trusted: header, metadata, config, tensors, vocabulary, checksums, training state.

Files are edited with the fuzzer's helpers (tests/fuzzcases.py): decompose a good file, change one
thing, compose it again with matching checksums (signed), so that the check under test is reached,
or with the old ones (unsigned), so that the checksum is what must catch it.
"""

import json
import math
import os
import resource
import time
import warnings
from pathlib import Path

import fuzzcases
import pytest
import torch
from conftest import assert_clean_error
from fuzzcases import HUGE_DIGITS, compose, decompose, join, split
from typer.testing import CliRunner

from charlm import CharlmError, checkpoint
from charlm.cells import cell_names
from charlm.cli import app
from charlm.config import ModelConfig
from charlm.decoding.beam import beam_search
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.sampling import Temperature, TopP
from charlm.decoding.scorer import ModelScorer
from charlm.model import CharRNN
from charlm.training.trainer import Progress

COMPAT = Path(__file__).parent / "data" / "compat"
runner = CliRunner()


def run(*args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, [str(a) for a in args])
    assert not caught, [str(w.message) for w in caught]
    return result


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fuzzcases.make_bases(tmp_path_factory.mktemp("bases"), ("lstm-last", "gru-best"))


def edited(base, change, signed=True) -> bytes:
    parts = decompose(base.blob)
    change(parts)
    return compose(parts, signed=signed)


def write(tmp_path, blob: bytes) -> Path:
    p = tmp_path / "edited.safetensors"
    p.write_bytes(blob)
    return p


def set_value(parts, name, index, value):
    dtype, shape, raw = parts.tensors[name]
    t = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    t[index] = value
    parts.tensors[name] = [dtype, shape, t.numpy().tobytes()]


# -- the schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", cell_names())  # every registered cell
def test_expected_shapes_are_the_models(cell):
    cfg = ModelConfig(cell=cell, num_layers=3, rnn_size=6, embed_size=5, vocab_size=7)
    model = CharRNN(cfg)
    assert list(checkpoint.model_tensor_shapes(cfg).items()) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert list(checkpoint.model_tensor_shapes(cfg)) == list(model.state_dict())


def test_checksums_are_written_verified_and_reported(bases, tmp_path):
    base = bases["lstm-last"]
    ckpt = checkpoint.load(base.path)
    assert ckpt.checksum == "verified"
    md = checkpoint.read_header(base.path)["__metadata__"]
    parts = decompose(base.blob)
    names = sorted(parts.tensors)
    import hashlib

    weights = hashlib.sha256(b"".join(parts.tensors[k][2] for k in names if k.startswith("model."))).hexdigest()
    assert md["weights_sha256"] == weights  # as docs/checkpoint-format.md defines it
    r = run("info", base.path)
    assert r.exit_code == 0 and "weights checksum" in r.stdout and "verified" in r.stdout
    old = checkpoint.load(COMPAT / "lstm.safetensors")  # written before checksums
    assert old.checksum == "none"
    r = run("info", COMPAT / "lstm.safetensors")
    assert r.exit_code == 0 and "none (written before checksums; unchecked)" in " ".join(r.stdout.split())


def test_altered_data_fails_its_checksum(bases, tmp_path):
    base = bases["lstm-last"]
    p = write(tmp_path, edited(base, lambda parts: set_value(parts, "model.head.bias", 3, 0.25), signed=False))
    with pytest.raises(CharlmError, match="weights do not match their sha256 checksum"):
        checkpoint.load(p)
    p = write(tmp_path, edited(base, lambda parts: set_value(parts, "train_state.optim.0.exp_avg", 0, 0.25), signed=False))
    with pytest.raises(CharlmError, match="metadata or training state does not match its sha256 checksum"):
        checkpoint.load(p)

    def retitle(parts):
        parts.meta["vocab"]["chars"] = parts.meta["vocab"]["chars"].replace("z", "{")

    p = write(tmp_path, edited(base, retitle, signed=False))
    with pytest.raises(CharlmError, match="metadata or training state does not match"):
        checkpoint.load(p)


@pytest.mark.parametrize(
    "value, pattern",
    [
        (float("nan"), "NaN or infinite"),
        (float("inf"), "NaN or infinite"),
        (1e35, "overflow float32"),
        (-3e38, "overflow float32"),
    ],
)
@pytest.mark.parametrize("name", ["model.head.bias", "model.embed.weight", "model.rnn.weight_hh_l1"])
def test_nonfinite_and_overflowing_weights_are_refused(bases, tmp_path, name, value, pattern):
    p = write(tmp_path, edited(bases["lstm-last"], lambda parts: set_value(parts, name, 0, value)))
    with pytest.raises(CharlmError, match=pattern):
        checkpoint.load(p)


def _header_with(base, **changes) -> bytes:
    n, text, data = split(base.blob)
    header = json.loads(text)
    for name, value in changes.items():
        header[name.replace("__", ".")] = value
    return join(json.dumps(header).encode(), data)


@pytest.mark.parametrize(
    "header, pattern",
    [
        (b"[1, 2]", "header is a JSON list"),
        (b'"text"', "header is a JSON str"),
        (b'{"__metadata__": [1]}', "__metadata__ is not a mapping"),
        (b'{"__metadata__": {"format": 3}}', "__metadata__ is not a mapping of text to text"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (
            b'{"__metadata__": {}, "x": {"dtype": "F32", "shape": [' + HUGE_DIGITS.encode() + b'], "data_offsets": [0, 4]}}',
            "thousands of digits",
        ),
        (b'{"__metadata__": {}, "x": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "NaN is not a JSON number"),
        (b'{"__metadata__": {}, "x": {"dtype": "F32", "shape": [1], "data_offsets": []}}', "invalid data_offsets"),
        (b'{"__metadata__": {}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', "invalid data_offsets"),
        (
            b'{"__metadata__": {}, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
            "do not match its dtype and shape",
        ),
        (b'{"__metadata__": {}, "x": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype"),
        (b'{"__metadata__": {}, "x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "invalid shape"),
        (b'{"__metadata__": {}, "x": [1]}', "is not {dtype, shape, data_offsets}"),
        (b'{"a": 1, "a": 2}', "appears twice"),
    ],
)
def test_malformed_headers_are_clean_errors(tmp_path, header, pattern):
    p = write(tmp_path, join(header, b"\0" * 64, pad=False))
    with pytest.raises(CharlmError, match=pattern):
        checkpoint.load(p)


def test_tensor_layout_is_checked(bases, tmp_path):
    base = bases["gru-best"]
    header = json.loads(split(base.blob)[1])
    name = "model.head.bias"
    b, e = header[name]["data_offsets"]
    for offsets, pattern in [([b + 4, e + 4], "gap|overlaps"), ([b, 10**12], "do not match"), ([e, b], "do not match")]:
        p = write(tmp_path, _header_with(base, **{name.replace(".", "__"): {**header[name], "data_offsets": offsets}}))
        with pytest.raises(CharlmError, match=pattern):
            checkpoint.load(p)


def test_an_absurd_config_is_refused_before_anything_is_allocated(bases, tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for layers, size, pattern in [
        (10**12, 8, "num_layers must be between 1 and 64"),
        (1e12, 8, "num_layers must be between"),
        (64, 8, "lacks 248 tensor"),
        (1, 16384, "lstm 1x16384.*needs F32"),
    ]:

        def big(parts):
            parts.meta["model"]["num_layers"] = layers
            parts.meta["model"]["rnn_size"] = size

        p = write(tmp_path, edited(bases["lstm-last"], big))
        start = time.perf_counter()
        with pytest.raises(CharlmError, match=pattern):
            checkpoint.load(p)
        assert time.perf_counter() - start < 2
    # 1 x 16384 would be 1.07 billion weights (4 GiB): nothing near that was allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_vocabulary_must_match_the_model_and_the_tokenizer(bases, tmp_path):
    base = bases["lstm-last"]
    cases = [
        (
            lambda p: p.meta["vocab"].update(chars=p.meta["vocab"]["chars"][:-1]),
            "vocabulary has 40 symbols but the model's output has 41",
        ),
        (
            lambda p: p.meta["vocab"].update(chars=p.meta["vocab"]["chars"][:-1] + p.meta["vocab"]["chars"][0]),
            "symbols must be distinct",
        ),
        (lambda p: p.meta["vocab"].update(chars=p.meta["vocab"]["chars"][:-1] + "\ud800"), "surrogate"),
        (lambda p: p.meta["vocab"].update(kind="spm"), "holds no serialized model"),
        (lambda p: p.meta["vocab"].update(kind="bytes", bytes=[300] * 41), "bytes must be a list of integers 0..255"),
        (
            lambda p: p.tensors.update({"tokenizer.spm": ["U8", [3], b"abc"]}),
            "char vocabulary but also a SentencePiece tokenizer",
        ),
        (lambda p: p.meta.update(vocab=[1, 2]), "section 'vocab' is not a mapping"),
        (lambda p: p.meta.pop("vocab"), "no 'vocab' section"),
    ]
    for change, pattern in cases:
        with pytest.raises(CharlmError, match=pattern):
            checkpoint.load(write(tmp_path, edited(base, change)))


def test_names_dtypes_and_extra_tensors(bases, tmp_path):
    base = bases["gru-best"]

    def reencode(p):
        dtype, shape, raw = p.tensors["model.head.bias"]
        p.tensors["model.head.bias"] = ["F64", shape, fuzzcases.reencode(raw, "F32", "F64")]

    cases = [
        (
            lambda p: p.tensors.update({"model.extra": ["F32", [1], bytes(4)]}),
            "holds a tensor 'model.extra' that its model config",
        ),
        (lambda p: p.tensors.update({"notes": ["U8", [2], b"hi"]}), "not part of a charlm checkpoint"),
        (lambda p: p.tensors.pop("model.rnn.weight_hh_l1"), "lacks 1 tensor"),
        (reencode, "model.head.bias is F64 \\[41\\], but its model config .* needs F32 \\[41\\]"),
        (lambda p: p.meta["model"].update(cell="lstm"), "needs F32"),
        (lambda p: p.meta["model"].update(vocab_size=0), "vocab_size must be between 1"),
    ]
    for change, pattern in cases:
        with pytest.raises(CharlmError, match=pattern):
            checkpoint.load(write(tmp_path, edited(base, change)))


def test_vocab_size_zero_is_one_line_without_warnings(bases, tmp_path):
    def zero(parts):
        parts.meta["model"]["vocab_size"] = 0
        for name in ("model.embed.weight", "model.head.weight", "model.head.bias"):
            dtype, shape, _ = parts.tensors[name]
            parts.tensors[name] = [dtype, [0] + shape[1:], b""]

    p = write(tmp_path, edited(bases["gru-best"], zero))
    for command in ("sample", "info", "eval"):
        assert_clean_error(
            run(command, p, *(["--text", bases["gru-best"].text] if command == "eval" else [])), "vocab_size must be between 1"
        )


def test_save_writes_0644_less_the_umask(tmp_path):
    model = CharRNN(ModelConfig(vocab_size=5, rnn_size=8, embed_size=4, num_layers=1))
    for mask, mode in [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)]:
        old = os.umask(mask)
        try:
            p = checkpoint.save(tmp_path / f"m{mask}.safetensors", model, {"n": 1})
        finally:
            os.umask(old)
        assert p.stat().st_mode & 0o777 == mode


def test_remove_stale_parts(tmp_path):
    stale = [tmp_path / ".last.safetensors.k2x_9abc.part", tmp_path / ".best.safetensors.a1b2c3d4.part"]
    kept = [tmp_path / "last.safetensors", tmp_path / "notes.part", tmp_path / ".hidden", tmp_path / "..part"]
    for p in stale + kept:
        p.write_bytes(b"x")
    (tmp_path / ".dir.abc.part").mkdir()
    assert sorted(checkpoint.remove_stale_parts(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale) and (tmp_path / ".dir.abc.part").is_dir()
    assert checkpoint.remove_stale_parts(tmp_path / "missing") == []


# -- the training state -----------------------------------------------------------------------------


def fresh(ckpt):
    torch.manual_seed(5)
    model = CharRNN(ckpt.model_config)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_train_state_round_trip(bases):
    ckpt = checkpoint.load(bases["lstm-last"].path)
    model, optimizer = fresh(ckpt)
    fields, hidden = checkpoint.unpack_train_state(ckpt, model, optimizer, Progress)
    assert Progress(**fields).step == ckpt.meta["train_state"]["step"]
    assert len(hidden) == 2 and hidden[0].shape[0] == 2 and hidden[0].dtype == torch.float32
    packed = checkpoint.pack_train_state(optimizer, hidden)
    saved = ckpt.train_tensors()
    assert set(packed) == set(saved)
    for k in saved:
        if k != "rng.torch":
            assert torch.equal(packed[k].float(), saved[k].float()), k
    assert torch.equal(torch.get_rng_state(), saved["rng.torch"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt.model_state()[k])


@pytest.mark.parametrize(
    "change, pattern",
    [
        (
            lambda p: p.tensors.update({"train_state.optim.0.max_exp_avg_sq": ["F32", [41, 4], bytes(41 * 16)]}),
            "unknown training-state tensor",
        ),
        (
            lambda p: p.tensors.update({"train_state.rng.torch": ["U8", [16], bytes(16)]}),
            "rng.torch is U8 \\[16\\]; expected U8 \\[5056\\]",
        ),
        (
            lambda p: p.tensors.update(
                {"train_state.optim.0.exp_avg": ["F32", [4, 41], p.tensors["train_state.optim.0.exp_avg"][2]]}
            ),
            "optim.0.exp_avg is F32 \\[4, 41\\]; expected F32 \\[41, 4\\]",
        ),
        (
            lambda p: p.tensors.update({"train_state.hidden.0": ["F32", [1, 2, 16], p.tensors["train_state.hidden.0"][2]]}),
            "hidden.0 is F32 \\[1, 2, 16\\]; expected F32 \\[2, rows, 8\\]",
        ),
        (lambda p: p.tensors.pop("train_state.hidden.1"), "carried state of a lstm model is 2 tensor"),
        (lambda p: p.tensors.pop("train_state.optim.3.step"), "optimizer state of parameter 3 lacks step"),
        (
            lambda p: p.tensors.update({"train_state.optim.99.step": ["F32", [], bytes(4)]}),
            "for parameter 99, but the model has 11",
        ),
        (lambda p: p.meta["train_state"].update(step=1.5), "field step must be an integer >= 0 \\(got 1.5\\)"),
        (lambda p: p.meta["train_state"].update(step="12"), "field step must be an integer"),
        (
            lambda p: p.meta["train_state"].update(best_val=None),
            "best_val must be a finite number >= 0 \\(or Infinity\\) \\(got null\\)",
        ),
        (lambda p: p.meta["train_state"].update(best_val=float("nan")), "best_val must be a finite number"),
        (lambda p: p.meta["train_state"].update(elapsed=float("inf")), "elapsed must be a finite number >= 0 \\(got inf\\)"),
        (lambda p: p.meta.pop("train_state"), "training-state tensors but no training-state record"),
    ],
)
def test_bad_train_states_are_refused_on_load(bases, tmp_path, change, pattern):
    with pytest.raises(CharlmError, match=pattern):
        checkpoint.load(write(tmp_path, edited(bases["lstm-last"], change)))


def test_unpack_checks_everything_before_touching_anything(bases, tmp_path):
    def unknown(parts):
        parts.meta["train_state"]["future_field"] = 3  # loads (sample ignores it); --resume refuses it

    ckpt = checkpoint.load(write(tmp_path, edited(bases["lstm-last"], unknown)))
    model, optimizer = fresh(ckpt)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(CharlmError, match="unknown training-state field.*future_field"):
        checkpoint.unpack_train_state(ckpt, model, optimizer, Progress)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {} and torch.equal(torch.get_rng_state(), rng)
    # another model's shape: named, nothing loaded
    other = CharRNN(ModelConfig(cell="lstm", num_layers=2, rnn_size=9, embed_size=4, vocab_size=41))
    with pytest.raises(CharlmError, match="model being trained is not the checkpoint's"):
        checkpoint.unpack_train_state(
            checkpoint.load(bases["lstm-last"].path), other, torch.optim.AdamW(other.parameters()), Progress
        )
    with pytest.raises(CharlmError, match="holds no training state"):
        best = checkpoint.load(bases["gru-best"].path)
        m, o = fresh(best)
        checkpoint.unpack_train_state(best, m, o, Progress)


def test_resume_of_a_bad_train_state_is_one_line(bases, tmp_path):
    base = bases["lstm-last"]
    for change, pattern in [
        (lambda p: p.meta["train_state"].update(lr=3), "unknown training-state field"),
        (lambda p: p.meta["train_state"].update(best_val=None), "best_val must be"),
    ]:
        p = write(tmp_path, edited(base, change))
        r = run("train", base.data_dir, "--resume", p, "--out", tmp_path / "out", "--max-steps", "9")
        assert_clean_error(r, pattern)


# -- decoding: clean errors, and nothing but finite numbers in JSON ----------------------------------


def test_processors_and_beam_refuse_what_cannot_work():
    logits = torch.log_softmax(torch.tensor([[0.5, 2.0, -1.0]]), dim=-1)
    cold = Temperature(1e-30)(logits)  # the smallest allowed: still a distribution (all on the most likely)
    assert torch.softmax(cold, dim=-1).tolist() == [[0.0, 1.0, 0.0]]
    with pytest.raises(CharlmError, match="at least 1e-30 .*use --greedy"):
        Temperature(1e-320)  # rounds to 0 in float32: every logit -inf, NaN probabilities
    with pytest.raises(CharlmError, match="finite"):
        Temperature(float("inf"))
    with pytest.raises(CharlmError, match="temperature must be > 0"):
        Temperature(float("nan"))
    with pytest.raises(CharlmError, match="top-p must be in"):
        TopP(float("nan"))
    model = CharRNN(ModelConfig(vocab_size=5, rnn_size=8, embed_size=4, num_layers=1))
    from charlm.tokenizers.vocab import Vocab

    scorer = ModelScorer(model, Vocab("char", range(97, 102)))
    for penalty in (float("nan"), float("inf"), 11.0, -1e308):
        with pytest.raises(CharlmError, match="length-penalty must be a number between -10.0 and 10.0"):
            beam_search(scorer, torch.zeros(1, dtype=torch.long), 5, 2, 1, penalty)
    assert beam_search(scorer, torch.zeros(1, dtype=torch.long), 5, 2, 1, 10.0)
    for weights in ([1e308, 1e308], [5e-324, 1.0], [1.0, 1e-300]):
        e = Ensemble([scorer, scorer], weights)
        assert all(math.isfinite(float(x)) for x in e.log_weights) and math.isclose(sum(e.weights), 1.0)
    assert Ensemble([scorer, scorer], [1e308, 1e308]).weights == [0.5, 0.5]
    for bad in ([float("nan"), 1.0], [float("inf"), 1.0], [0.0, 1.0]):
        with pytest.raises(CharlmError, match="positive finite"):
            Ensemble([scorer, scorer], bad)


def strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_decoding_commands_give_clean_errors_and_strict_json(bases, tmp_path):
    base = bases["lstm-last"]
    p = base.path
    greedy = run("sample", p, "--length", "30", "--greedy", "--prime", "The ")
    cold = run("sample", p, "--length", "30", "--temperature", "1e-30", "--seed", "3", "--prime", "The ")
    assert greedy.exit_code == 0 and cold.exit_code == 0 and cold.stdout == greedy.stdout
    assert_clean_error(run("sample", p, "--temperature", "1e-320"), "temperature must be at least 1e-30.*--greedy")
    assert_clean_error(run("sample", p, "--device", "tpu"), "--device must be one of")
    r = run("sample", p, p, "--length", "10", "--weights", "1e308,1e308", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert_clean_error(run("beam", p, "--length-penalty", "nan"), "length-penalty must be")
    assert_clean_error(run("sample", p, "--top-p", "nan"), "top-p must be in")
    assert_clean_error(run("sample", p, "--temperature", "inf"), "temperature must be a finite number")
    assert_clean_error(run("eval", p, p, "--text", base.text, "--weights", "nan,1"), "positive finite")
    r = run("beam", p, "--length", "10", "--json", "--prime", "The ")
    assert r.exit_code == 0 and strict_json(r.stdout)[0]["bits_per_char"] > 0
    r = run("eval", p, p, "--text", base.text, "--json")
    assert r.exit_code == 0 and len(strict_json(r.stdout)["members"]) == 2

    def no_val(parts):  # a run without a validation split: NaN figures; Infinity before the first evaluation
        parts.meta["metrics"]["val_bpc"] = float("nan")
        parts.meta["train_state"]["best_val"] = float("inf")

    q = write(tmp_path, edited(base, no_val))
    r = run("info", q, "--json")
    assert r.exit_code == 0, r.output
    meta = strict_json(r.stdout)
    assert meta["metrics"]["val_bpc"] is None and meta["train_state"]["best_val"] is None
    r = run("info", q)
    assert r.exit_code == 0 and "nan" in r.stdout


def test_info_prints_file_text_literally(bases, tmp_path):
    def markup(parts):
        parts.meta["provenance"]["data_dir"] = "[/bold] [link=x]evil[/link] \x1b[31mred"

    r = run("info", write(tmp_path, edited(bases["gru-best"], markup)))
    assert r.exit_code == 0, r.output
    assert "[/bold]" in r.stdout and "\x1b[31m" not in r.stdout


def test_json_output_refuses_nan():
    from charlm.jsonsafe import strict_json

    with pytest.raises(CharlmError, match="not a finite number"):
        strict_json({"bits_per_char": float("nan")})
    assert strict_json({"a": 1.5}) == '{"a": 1.5}'
