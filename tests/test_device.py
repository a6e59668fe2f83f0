"""The device-capable checks, on the device $CHARLM_TEST_DEVICE names (default cpu; benchmarks/gpu_check.sh sets cuda).

Every registered cell on that device: its forward against the same weights on the CPU; single steps
against whole windows in fp32 and bf16; the two scans of the minimal cells against each other; a few
training steps there, and the checkpoint they write read back and sampled on the CPU.
"""

import os

import pytest
import torch
from conftest import small_configs

from charlm import checkpoint
from charlm.cells import cell_names
from charlm.cells.scan import log_scan, sequential_scan
from charlm.config import ModelConfig
from charlm.decoding.sampling import processors, sample
from charlm.decoding.scorer import ModelScorer
from charlm.devices import cpu_has_bf16, gpu_has_bf16
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab
from charlm.training.trainer import Trainer

DEVICE = torch.device(os.environ.get("CHARLM_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("CHARLM_TEST_DEVICE=cuda, but this torch sees no CUDA device")
CUDA = DEVICE.type == "cuda"
VOCAB = Vocab.from_text("abcdefgh\n .,")
CELLS = cell_names()
HAS_BF16 = gpu_has_bf16(DEVICE) if CUDA else cpu_has_bf16()
# cuDNN and oneDNN sum in different orders (and cuDNN's RNNs may use TF32 tensor cores).
FORWARD_ATOL = 2e-3 if CUDA else 1e-6


def model_for(cell: str, device: torch.device, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, num_layers=2, rnn_size=64, embed_size=16, vocab_size=len(VOCAB))
    return CharRNN(cfg).eval().to(device)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_on_the_device_equals_the_cpu(cell):
    cpu, dev = model_for(cell, torch.device("cpu")), model_for(cell, DEVICE)
    ids = torch.randint(len(VOCAB), (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = cpu(ids, cpu.init_state(3))
        got, _ = dev(ids.to(DEVICE), dev.init_state(3))
    torch.testing.assert_close(got.cpu(), want, atol=FORWARD_ATOL, rtol=0)


@pytest.mark.parametrize(
    "dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(not HAS_BF16, reason="no native bf16 here"))]
)
@pytest.mark.parametrize("cell", CELLS)
def test_single_steps_equal_whole_windows_on_the_device(cell, dtype):
    scorer = ModelScorer(model_for(cell, DEVICE), VOCAB, dtype=dtype)
    ids = torch.randint(len(VOCAB), (2, 24), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    window, _ = scorer.score(ids, scorer.start(2))  # (B, T, V)
    state = scorer.start(2)
    steps = []
    for t in range(ids.shape[1]):
        logp, state = scorer.step(ids[:, t], state)
        steps.append(logp)
    atol = 5e-4 if dtype == "fp32" else 0.1  # bf16: the kernels round differently; the distributions still agree
    torch.testing.assert_close(torch.stack(steps, dim=1).float().cpu(), window.float().cpu(), atol=atol, rtol=0)


def test_the_two_scans_agree_on_the_device():
    torch.manual_seed(3)
    a = torch.rand(4, 50, 32, device=DEVICE) * 0.98 + 0.01  # decays in (0, 1)
    b = torch.rand(4, 50, 32, device=DEVICE) + 0.01  # positive inputs (the log scan needs b > 0)
    h0 = torch.randn(4, 32, device=DEVICE)
    torch.testing.assert_close(log_scan(a.log(), b.log(), h0), sequential_scan(a, b, h0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "mingru"])
def test_trained_on_the_device_samples_on_the_cpu(tmp_path, prepared, monkeypatch, cell):
    """A checkpoint written by a run on the device is read on the CPU (tensors saved on the CPU) and
    gives the same distributions there; sampling on both devices works."""
    monkeypatch.setenv("CHARLM_THREADS", "1")
    model_cfg, cfg = small_configs(cell, max_steps=3, eval_every=3, device=DEVICE.type)
    Trainer(model_cfg, cfg, prepared, tmp_path / "run").run()
    ckpt = checkpoint.load(tmp_path / "run" / "last.safetensors")
    assert ckpt.meta["provenance"]["device"].startswith(DEVICE.type)
    on_cpu = ModelScorer(ckpt.build_model(), ckpt.vocab)
    on_dev = ModelScorer(ckpt.build_model().to(DEVICE), ckpt.vocab)
    ids = torch.as_tensor(ckpt.vocab.encode("the quick brown fox"))[None]
    want, _ = on_cpu.score(ids, on_cpu.start(1))
    got, _ = on_dev.score(ids, on_dev.start(1))
    torch.testing.assert_close(got.cpu(), want, atol=FORWARD_ATOL, rtol=0)
    prime = torch.as_tensor(ckpt.vocab.encode("The "))
    for scorer in (on_cpu, on_dev):
        out = sample(scorer, prime, 30, processors(0.8), generator=torch.Generator().manual_seed(0), num_samples=4)
        assert out.shape == (4, 30) and int(out.min()) >= 0 and int(out.max()) < len(ckpt.vocab)
