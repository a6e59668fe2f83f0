"""Dynamic evaluation (charlm/decoding/dynamic.py): `eval --dynamic`, `sample --adapt FILE`."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, make_text, run, small_configs

from charlm import checkpoint
from charlm.cells import cell_names
from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.decoding import dynamic
from charlm.training.trainer import Trainer


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small model per registered cell, trained long enough to have learned something (a few seconds each)."""
    root = tmp_path_factory.mktemp("dyn")
    (root / "t.txt").write_text(make_text(20000))
    prep.prepare([root / "t.txt"], root / "prepared")
    data = PreparedData(root / "prepared")
    torch.set_num_threads(1)
    out = {}
    for cell in cell_names():
        model_cfg, cfg = small_configs(cell, batch_size=8, seq_length=32, lr=1e-2, max_steps=120)
        model_cfg.rnn_size = 64
        Trainer(model_cfg, cfg, data, root / cell).run()
        out[cell] = root / cell
    return out


def static_token_nll(ckpt, tokens):
    model = ckpt.build_model()
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens[:-1]).long()[None])
        logp = torch.log_softmax(logits.float(), -1)
    return -logp.gather(-1, torch.from_numpy(tokens[1:]).long()[None, :, None]).squeeze(-1)[0]


@pytest.mark.parametrize("cell", cell_names())
@pytest.mark.parametrize("update, rates", [("sgd", (0.3, 1.0, 3.0)), ("rms", (0.001, 0.003, 0.01))])
def test_a_passage_twice_first_copy_static_second_far_lower(models, cell, update, rates):
    """The first copy is one window: scored before any step, exactly as static evaluation; the second after it.

    How far one step goes depends on the step size (cells differ): the best of three must cut the second copy by 20%.
    """
    ckpt = checkpoint.load(models[cell] / "last.safetensors")
    rng = random.Random(0)
    passage = np.array([rng.randrange(len(ckpt.vocab)) for _ in range(64)])  # symbols the model cannot predict
    tokens = np.concatenate([passage, passage])
    static = static_token_nll(ckpt, tokens)
    source = dynamic.adapt_source(ckpt)
    seconds = []
    for lr in rates:
        adapter = dynamic.Adapter(ckpt.build_model(), dynamic.Settings(update, lr, 0.0, len(passage)), source.mean_sq)
        windows = []
        dynamic.dynamic_evaluate([adapter], tokens, record=windows)
        first, second = windows[0][0], windows[1][0]
        assert torch.allclose(first, static[:64], rtol=0, atol=1e-5)
        seconds.append(float(second.mean()))
    assert min(seconds) < 0.8 * float(static[64:].mean()), (seconds, float(static[64:].mean()))


def test_the_trained_model_is_not_changed_in_memory_or_on_disk(models, tmp_path):
    last = models["lstm"] / "last.safetensors"
    before = digest(last)
    ckpt = checkpoint.load(last)
    model = ckpt.build_model()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = dynamic.Adapter(model, dynamic.Settings("rms", 0.01, 0.0, 16), dynamic.adapt_source(ckpt).mean_sq)
    dynamic.dynamic_evaluate([adapter], np.asarray(ckpt.vocab.encode(make_text(300, seed=3))))
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())  # the copy in memory adapted
    text = tmp_path / "t.txt"
    text.write_text(make_text(500, seed=4))
    assert run("eval", last, "--text", text, "--dynamic", "--dyn-lr", "0.01").exit_code == 0
    assert run("sample", last, "--adapt", text, "--length", "20", "--seed", "1").exit_code == 0
    assert digest(last) == before


def test_zero_learning_rate_is_static_evaluation(models):
    last = models["gru"] / "last.safetensors"
    r = run("eval", last, "--dynamic", "--dyn-lr", "0", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["dynamic"]["bits_per_char"] == pytest.approx(out["static"]["bits_per_char"], rel=1e-6)
    assert out["dynamic"]["lr"] == 0.0 and out["dynamic"]["update"] == "rms" and out["dynamic"]["note"] is None
    r = run("eval", last, "--dynamic", "--json", "--dyn-lr", "0.003")
    moved = json.loads(r.stdout)
    assert moved["static"]["bits_per_char"] == out["static"]["bits_per_char"]
    assert moved["dynamic"]["bits_per_char"] != pytest.approx(out["static"]["bits_per_char"], rel=1e-4)  # it can tell
    assert moved["dynamic"]["window"] == 32  # the checkpoint's training window
    assert moved["dynamic"]["chars_per_s"] > 0 and moved["static"]["chars_per_s"] > 0


def test_a_file_without_optimizer_state_falls_back_to_sgd_and_says_so(models):
    best = models["lstm"] / "best.safetensors"
    r = run("eval", best, "--dynamic", "--json", "--dyn-window", "50")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["dynamic"]["update"] == "sgd" and out["dynamic"]["window"] == 50
    assert out["dynamic"]["lr"] == dynamic.DEFAULTS["sgd"][0]
    assert "plain SGD" in out["dynamic"]["note"]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no optimizer state" in lines[0] and "plain SGD" in lines[0]
    assert_clean_error(
        run("eval", best, "--dynamic", "--dyn-update", "rms"), "--dyn-update rms needs the training gradient statistics"
    )


def test_each_ensemble_member_adapts_on_its_own(models):
    a, b = models["lstm"] / "last.safetensors", models["gru"] / "last.safetensors"
    both = json.loads(run("eval", a, b, "--dynamic", "--json", "--dyn-window", "32").stdout)
    alone = [json.loads(run("eval", p, "--dynamic", "--json", "--dyn-window", "32").stdout) for p in (a, b)]
    for member, single in zip(both["members"], alone):
        assert member["dynamic"]["bits_per_char"] == pytest.approx(single["dynamic"]["bits_per_char"], rel=1e-6)
        assert member["static"]["bits_per_char"] == pytest.approx(single["static"]["bits_per_char"], rel=1e-6)
    assert both["dynamic"]["bits_per_char"] < both["static"]["bits_per_char"]


def test_table_output(models):
    r = run("eval", models["lstm"] / "last.safetensors", "--dynamic")
    assert r.exit_code == 0, r.output
    assert "static" in r.stdout and "dynamic" in r.stdout and "RMS-normalised" in r.stdout


def test_sample_adapt_continues_in_the_style_of_the_text(models, tmp_path):
    last = models["lstm"] / "last.safetensors"
    style = tmp_path / "style.txt"
    style.write_text("The lazy dog jumps over the lazy dog.\n" * 40)
    common = ["--length", "300", "--seed", "3", "--num-samples", "4"]
    plain = run("sample", last, *common)
    adapted = run("sample", last, *common, "--adapt", style, "--dyn-lr", "1e-3")
    assert adapted.exit_code == 0, adapted.output
    assert adapted.stdout != plain.stdout
    assert adapted.stdout.count("lazy dog") > plain.stdout.count("lazy dog") + 10
    assert "adapted to" in adapted.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dynamic", "--dyn-lr", "-1"], "--dyn-lr must be a finite number >= 0"),
        (["--dynamic", "--dyn-lr", "nan"], "--dyn-lr must be a finite number >= 0"),
        (["--dynamic", "--dyn-decay", "2"], r"--dyn-decay must be in \[0, 1\]"),
        (["--dynamic", "--dyn-update", "adam"], "--dyn-update must be one of auto, rms, sgd"),
        (["--dynamic", "--dyn-window", "0"], "--dyn-window must be between 1"),
    ],
)
def test_bad_dynamic_options_are_one_line_errors(models, flags, message):
    assert_clean_error(run("eval", models["lstm"] / "last.safetensors", *flags), message)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"\xff\xfe\x00bad", "is not UTF-8 text"),
        ("dir", "is a directory"),
    ],
)
def test_bad_adapt_files_are_one_line_errors(models, tmp_path, content, message):
    path = tmp_path / "adapt.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert_clean_error(run("sample", models["lstm"] / "last.safetensors", "--adapt", path), f"--adapt .*{message}")
    assert_clean_error(
        run("sample", models["lstm"] / "last.safetensors", "--adapt", tmp_path / "adapt.txt", "--dyn-lr", "-2")
        if content is None
        else run("sample", models["lstm"] / "last.safetensors", "--dyn-lr", "-2"),
        "--dyn-lr must be",
    )
