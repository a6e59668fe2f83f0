import json
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from charlm import CharlmError, checkpoint
from charlm.config import ModelConfig
from charlm.model import CharRNN


def test_round_trip_field_by_field(trained):
    path = trained / "last.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]
    assert meta["format"] == "charlm-checkpoint" and meta["format_version"] == "1"
    assert set(meta) == {"format", "format_version", "meta", "weights_sha256", "record_sha256"}
    import hashlib

    data = raw[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    part = lambda k: data[header[k]["data_offsets"][0] : header[k]["data_offsets"][1]]  # noqa: E731
    assert meta["weights_sha256"] == hashlib.sha256(b"".join(part(k) for k in names if k.startswith("model."))).hexdigest()
    rest = meta["meta"].encode() + b"".join(part(k) for k in names if not k.startswith("model."))
    assert meta["record_sha256"] == hashlib.sha256(rest).hexdigest()
    record = json.loads(meta["meta"])
    for key in ("model", "train", "vocab", "tokenizer", "metrics", "provenance", "train_state"):
        assert key in record
    assert record["model"]["cell"] == "lstm" and record["model"]["vocab_size"] == len(record["vocab"]["chars"])
    names = [k for k in header if k != "__metadata__"]
    assert "model.embed.weight" in names and "model.head.bias" in names
    assert any(k.startswith("train_state.optim.") for k in names)
    assert "train_state.rng.torch" in names
    for t in header.values():
        if isinstance(t, dict) and "dtype" in t:
            assert t["dtype"] in ("F32", "U8", "I64", "F64")
    ckpt = checkpoint.load(path)
    model = ckpt.build_model()
    again = CharRNN(ckpt.model_config)
    again.load_state_dict({k[len("model.") :]: v for k, v in ckpt.tensors.items() if k.startswith("model.")})
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def _model():
    return CharRNN(ModelConfig(vocab_size=5, rnn_size=8, embed_size=4, num_layers=1))


def test_newer_version_is_refused(tmp_path):
    p = tmp_path / "future.safetensors"
    checkpoint.save(p, _model(), {"model": {}, "vocab": {"kind": "char", "chars": "abcde"}})
    raw = bytearray(p.read_bytes())
    i = raw.find(b'"format_version":"1"')
    raw[i : i + 20] = b'"format_version":"9"'
    p.write_bytes(bytes(raw))
    with pytest.raises(CharlmError, match="version 9.*upgrade"):
        checkpoint.load(p)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("via", ["torch.save", "pickle"])
def test_pickle_payload_is_rejected_not_executed(tmp_path, via):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.safetensors"
    if via == "torch.save":
        torch.save({"x": Payload(marker)}, p)
    else:
        p.write_bytes(pickle.dumps(Payload(marker)))
    # torch.save writes a zip archive holding a pickle; pickle.dumps a bare pickle: each is named as what it is
    with pytest.raises(
        CharlmError, match="a zip archive \\(a torch.save file\\?\\)" if via == "torch.save" else "is a pickle file"
    ):
        checkpoint.load(p)
    assert not marker.exists()


def test_missing_truncated_and_foreign_files(tmp_path, trained):
    with pytest.raises(CharlmError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.safetensors")
    good = (trained / "best.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CharlmError, match="truncated"):
        checkpoint.load(cut)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign)
    with pytest.raises(CharlmError, match="not a charlm checkpoint"):
        checkpoint.load(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, this is text, not a checkpoint at all")
    with pytest.raises(CharlmError):
        checkpoint.load(junk)


def test_save_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "c.safetensors"
    checkpoint.save(p, _model(), {"n": 1})
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        checkpoint.save(p, _model(), {"n": 2})
    assert p.read_bytes() == before
    assert not list(tmp_path.glob("*.part"))


def test_checking_a_checkpoints_shapes_skips_the_random_init():
    """parameter_shapes builds the model on the meta device; the first normal_ there costs ~2 s (torch
    loads its reference kernels), so the init is skipped: a fresh process answers in well under a
    second, and a model built afterwards is still initialised at random."""
    code = (
        "import time, torch\n"
        "from charlm.config import ModelConfig\n"
        "from charlm.model import CharRNN, parameter_shapes\n"
        "cfg = ModelConfig(cell='lstm', num_layers=2, rnn_size=512, embed_size=64, vocab_size=100)\n"
        "t = time.perf_counter(); shapes = parameter_shapes(cfg); took = time.perf_counter() - t\n"
        "model = CharRNN(cfg)\n"
        "assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}\n"
        "assert model.embed.weight.std() > 0.5\n"
        "print(took)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 1.0
