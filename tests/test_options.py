"""Each option is declared once (charlm/config.py); the flags, their help, the YAML keys, the API's
keywords and the checks all come from that declaration."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main
from conftest import run

from charlm import OptionError, config
from charlm.cli import app
from charlm.cli import data as cli_data


def train_command():
    return typer.main.get_command(app).commands["train"]


def test_every_field_is_declared_with_help_and_a_valid_default():
    for cls in config.SECTIONS.values():
        for f in dataclasses.fields(cls):
            declared = f.metadata["option"]
            assert declared.help and not declared.help.endswith("."), f.name  # the sentence's end comes with the default
    config.validate(config.ModelConfig(vocab_size=10), config.TrainConfig())  # every default passes its own check
    assert "vocab_size" not in config.all_keys()  # set from the data, never by hand


def test_the_flags_the_yaml_keys_and_the_api_keywords_are_the_declared_options():
    names = [d.name for d in config.declared_options()]
    flags = {p.name: p for p in train_command().params}
    for d in config.declared_options():
        param = flags[d.name]
        assert param.opts[0] == "--" + d.name.replace("_", "-")
        assert param.help == d.help and param.default is None  # None: not given, so presets and config files apply
    assert config.all_keys() == names
    config.check_options(names, "charlm.train")
    with pytest.raises(OptionError, match="unknown option.*nproc"):
        config.check_options(["nproc"], "charlm.train")


def test_the_help_says_the_real_default():
    helps = {d.name: d.help for d in config.declared_options()}
    model, train = config.ModelConfig(), config.TrainConfig()
    assert "(default: 2)" in helps["num_layers"] and model.num_layers == 2
    assert "default: 0.002)" in helps["lr"] and train.lr == 0.002
    assert "(default: off)" in helps["compile"]
    assert "default: fp32" in helps["dtype"] and "auto" in helps["dtype"]
    assert "constant, step or cosine" in helps["schedule"]
    assert "default" not in helps["max_steps"]  # no default: no limit
    for d in config.declared_options():
        default = getattr(model if d.section == "model" else train, d.name)
        if default is not None and not isinstance(default, bool):
            assert f"default: {default:g})" in d.help if isinstance(default, float) else f"default: {default})" in d.help, d.name


def test_flags_reach_the_api_as_keywords(tmp_path, text_file, monkeypatch):
    from charlm.api import training

    seen = {}

    def fake_train(input, out, **kwargs):
        seen.update(kwargs, input=input, out=out)
        return training.TrainResult(out, out / "last.safetensors", None, out, 0, 0.0, None, None, None, 0.0)

    monkeypatch.setattr(training, "train", fake_train)
    r = run(
        "train",
        text_file,
        "--out",
        tmp_path / "run",
        "--lr",
        "0.01",
        "--compile",
        "--time-budget",
        "10m",
        "--rnn-size",
        "32",
        "--dtype",
        "auto",
        "--vocab-size",
        "300",
        "--tokenizer",
        "bpe",
    )
    assert r.exit_code == 0, r.output
    assert seen["lr"] == 0.01 and seen["compile"] is True and seen["time_budget"] == "10m" and seen["rnn_size"] == 32
    assert seen["dtype"] == "auto" and seen["vocab_size"] == 300 and seen["tokenizer"] == "bpe"
    assert seen["max_steps"] is None and seen["cell"] is None  # not given
    assert {d.name for d in config.declared_options()} <= set(seen)


# The messages as they were before the options were declared once: they must not change.
@pytest.mark.parametrize(
    "layer, message",
    [
        ({"cell": "x"}, "cell must be one of gru, lstm, rnn, peephole, mingru, minlstm (got 'x')"),
        ({"num_layers": 0}, "num_layers must be between 1 and 64 (got 0)"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"forget_bias": 101}, "forget_bias must be between -100 and 100 (got 101.0)"),
        ({"batch_size": 0}, "batch_size must be between 1 and 1048576 (got 0)"),
        ({"lr": 0}, "lr must be positive"),
        ({"weight_decay": -1}, "weight_decay must be >= 0"),
        ({"grad_clip": -1}, "grad_clip must be >= 0 (0 disables clipping)"),
        ({"schedule": "linear"}, "schedule must be one of constant, step, cosine (got 'linear')"),
        ({"warmup_steps": -1}, "warmup_steps must be between 0 and 2^63-1 (got -1)"),
        ({"lr_decay": 0}, "lr_decay must be in (0, 1]"),
        ({"decay_every": 0}, "decay_every must be between 1 and 2^63-1 (got 0)"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in [0, 1]"),
        ({"max_steps": 0}, "max_steps must be between 1 and 2^63-1 (got 0)"),
        ({"max_epochs": 0}, "max_epochs must be positive"),
        ({"time_budget": "0s"}, "time_budget must be positive"),
        ({"eval_every": 0}, "eval_every must be between 1 and 2^63-1 (got 0)"),
        ({"seed": -1}, f"seed must be between 0 and 2^63-1 = {config.MAX_COUNT} (got -1)"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda, mps (got 'tpu')"),
        ({"dtype": "fp16"}, "dtype must be one of fp32, bf16, auto (got 'fp16')"),
        (
            {"scheduled_sampling": "cosine"},
            "scheduled_sampling must be one of none, linear, exponential, inverse-sigmoid (got 'cosine')",
        ),
        ({"ss_k": -2}, "ss_k must be positive (got -2.0)"),
        ({"ss_floor": 1.5}, "ss_floor must be in [0, 1]: the lowest teacher-forcing probability (got 1.5)"),
        ({"ss_mode": "argmax"}, "ss_mode must be one of model, uniform (got 'argmax')"),
        ({"scheduled_sampling": "exponential", "ss_k": 2}, "ss_k for exponential: the factor per step, in (0, 1) (got 2.0)"),
    ],
)
def test_the_checks_say_what_they_said(layer, message):
    with pytest.raises(OptionError) as e:
        config.resolve(layer)
    assert str(e.value) == message


def test_the_checks_bounds_are_inclusive_where_they_say_so():
    assert config.interval("[0, 1)").ok(0) and not config.interval("[0, 1)").ok(1)
    assert not config.interval("(0, 1]").ok(0) and config.interval("(0, 1]").ok(1)
    assert config.between(1, 3).ok(1) and config.between(1, 3).ok(3) and not config.between(1, 3).ok(4)
    config.resolve({"dtype": "auto", "cell": "gru", "max_steps": config.MAX_COUNT, "ss_floor": 1})


def test_the_help_only_copies_are_the_real_lists():
    from charlm.tokenizers.spm import KINDS

    assert cli_data.TOKENIZER_KINDS == KINDS


def test_threads_is_a_global_option_passed_on_in_the_environment(monkeypatch):
    import os

    monkeypatch.setenv("CHARLM_THREADS", "unset")  # restored after the test
    r = run("--threads", "3", "corpus", "list")
    assert r.exit_code == 0, r.output
    assert os.environ["CHARLM_THREADS"] == "3"  # ranks and threads.py read it from here
    assert run("--threads", "0", "corpus", "list").exit_code != 0
