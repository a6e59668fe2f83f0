import pytest

from charlm import CharlmError, config


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
