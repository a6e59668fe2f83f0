import pytest

from charlm import CharlmError, config
from charlm.cells import cell_names


def test_precedence_defaults_preset_file_flags(tmp_path):
    preset = config.load_preset("demo")
    f = tmp_path / "c.yaml"
    f.write_text("rnn_size: 100\nlr: 0.01\n")
    model, train = config.resolve(preset, config.load_config_file(f), {"lr": 0.5, "rnn_size": None})
    assert model.rnn_size == 100  # file over preset; a flag not given (None) does not override
    assert train.lr == 0.5  # explicit flag wins
    assert train.schedule == preset["schedule"]  # preset over defaults
    assert train.grad_clip == config.TrainConfig().grad_clip  # default


def test_every_shipped_preset_resolves():
    for name in config.list_presets():
        config.resolve(config.load_preset(name))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("42", 42)])
def test_durations(text, seconds):
    assert config.parse_duration(text) == seconds


def test_errors():
    with pytest.raises(CharlmError, match="unknown preset"):
        config.load_preset("nope")
    with pytest.raises(CharlmError, match="cell must be"):
        config.resolve({"cell": "transformer"})
    with pytest.raises(CharlmError, match="expects int"):
        config.resolve({"rnn_size": "big"})
    with pytest.raises(CharlmError, match="does not exist"):
        config.load_config_file("/nonexistent.yaml")


def test_a_config_file_is_checked_like_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes("rnn_size: 64\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(CharlmError, match="not UTF-8"):
        config.load_config_file(f)
    for text, pattern in [
        ("1: 2\n", "option names must be text"),
        ("? [a, b]\n: 1\n", "not valid YAML|option names must be text"),
        ("~: 1\n", "option names must be text"),
        ("rnn_size: [64]\n", "single value"),
        ("lr: {a: 1}\n", "single value"),
        ("[" * 5000 + "]" * 5000 + "\n", "mapping|nested too deeply|not valid YAML"),
    ]:
        f.write_text(text)
        with pytest.raises(CharlmError, match=pattern):
            config.load_config_file(f)
    d = tmp_path / "dir.yaml"
    d.mkdir()
    with pytest.raises(CharlmError, match="directory"):
        config.load_config_file(d)


@pytest.mark.parametrize(
    "layer, pattern",
    [
        ({"seed": 2**63}, r"seed must be between 0 and 2\^63-1"),
        ({"seed": -1}, r"seed must be between 0 and 2\^63-1"),
        ({"max_epochs": float("inf")}, "max_epochs must be a finite number"),
        ({"max_epochs": float("nan")}, "max_epochs must be a finite number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": "nan"}, "lr must be a finite number"),
        ({"grad_clip": float("inf")}, "grad_clip must be a finite number"),
        ({"dropout": float("nan")}, "dropout must be a finite number"),
        ({"time_budget": float("inf")}, "time_budget must be a finite number"),
        ({"time_budget": "9" * 400}, "time_budget must be a finite number"),
        ({"time_budget": True}, "duration"),
        ({"rnn_size": 10**12}, "rnn_size must be between 1 and 16384"),
        ({"num_layers": 10**12}, "num_layers must be between 1 and 64"),
        ({"num_layers": 1e12}, "num_layers must be between 1 and 64"),
        ({"embed_size": 10**6}, "embed_size must be between 1 and 16384"),
        ({"batch_size": 10**9}, "batch_size must be between 1 and"),
        ({"max_steps": 2**64}, r"max_steps must be between 1 and 2\^63-1"),
        ({"rnn_size": 16384, "num_layers": 2}, "parameters; at most 2\\^31"),
        ({"rnn_size": True}, "expects int, got True"),
        ({"lr": False}, "expects float, got False"),
        ({"rnn_size": float("inf")}, "expects int, got inf"),
        ({"rnn_size": "9" * 5000}, "expects int"),
        ({"lr": 10**400}, "expects float"),
        ({"dropout": None, "cell": None}, None),  # None: not given
    ],
)
def test_every_value_is_bounded(layer, pattern):
    if pattern is None:
        config.resolve(layer)
        return
    with pytest.raises(CharlmError, match=pattern):
        config.resolve(layer)


def test_yaml_and_checkpoint_values_go_through_the_same_checks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 9223372036854775808\n")
    with pytest.raises(CharlmError, match="seed must be between"):
        config.resolve(config.load_config_file(f))
    f.write_text("max_epochs: .inf\n")
    with pytest.raises(CharlmError, match="max_epochs must be a finite number"):
        config.resolve(config.load_config_file(f))
    f.write_text("rnn_size: yes\n")  # YAML 1.1: a boolean
    with pytest.raises(CharlmError, match="rnn_size expects int, got True"):
        config.resolve(config.load_config_file(f))
    good_model = {"cell": "gru", "num_layers": 1, "rnn_size": 8, "embed_size": 4, "dropout": 0.0, "vocab_size": 5}
    model, train = config.from_record(good_model, {"lr": 0.01, "not_a_field_any_more": 3}, "x.safetensors")
    assert model.cell == "gru" and train.lr == 0.01
    with pytest.raises(CharlmError, match="x.safetensors: unknown model option"):
        config.from_record({**good_model, "layers": 3}, {}, "x.safetensors")
    with pytest.raises(CharlmError, match="x.safetensors: the recorded config is invalid: num_layers"):
        config.from_record({**good_model, "num_layers": 10**12}, {}, "x.safetensors")
    with pytest.raises(CharlmError, match="vocab_size must be between 1"):
        config.from_record({**good_model, "vocab_size": 0}, {}, "x.safetensors")
    with pytest.raises(CharlmError, match="not a mapping"):
        config.from_record([], {}, "x.safetensors")
    with pytest.raises(CharlmError, match="expects int, got None"):
        config.from_record({**good_model, "rnn_size": None}, {}, "x.safetensors")


def test_num_parameters_matches_the_model():
    from charlm.model import CharRNN

    for cell in cell_names():
        cfg = config.ModelConfig(cell=cell, num_layers=3, rnn_size=12, embed_size=5, vocab_size=17)
        assert config.num_parameters(cfg) == CharRNN(cfg).num_parameters()
