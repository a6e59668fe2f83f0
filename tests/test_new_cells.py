"""The cells without a fused kernel (peephole, mingru, minlstm): their fast training paths against
the equations, in values and gradients; the scans against each other and across windows; the
forget-gate bias; and every cell through training, resume and the decoding commands."""

import json

import pytest
import torch

from charlm import checkpoint
from charlm.cells import Cell, cell_class, cell_names
from charlm.cells.peephole_kernel import PeepholeLayer
from charlm.cells.scan import _SequentialScan, log_scan, pick_scan, sequential_scan
from charlm.config import ModelConfig
from charlm.model import CharRNN
from tests.conftest import FAST, run, train_small


def cell_and_inputs(name, scan="auto", layers=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cell = cell_class(name)(6, 5, layers, 0.0).to(dtype)
    if hasattr(cell, "scan"):
        cell.scan = scan
    x = torch.randn(3, 7, 6, dtype=dtype, requires_grad=True)
    state = tuple((torch.randn_like(s) * 0.5).to(dtype).requires_grad_() for s in cell.zero_state(3))
    return cell, x, state


def gradients(cell, x, state, forward):
    out, new_state = forward(cell, x, state)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + sum((s * 0.3).sum() for s in new_state)
    inputs = [x, *state, *cell.parameters()]
    return out.detach(), [g.detach() for g in torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize(
    "name,scan",
    [("peephole", "auto"), ("mingru", "sequential"), ("mingru", "log"), ("minlstm", "sequential"), ("minlstm", "log")],
)
def test_fast_path_equals_the_equations_in_values_and_gradients(name, scan):
    cell, x, state = cell_and_inputs(name, scan)
    fast, fast_grads = gradients(cell, x, state, type(cell).forward)
    ref, ref_grads = gradients(cell, x, state, Cell.forward)  # the base class: layer_step, step by step
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert max(g.abs().max() for g in fast_grads) > 1e-3  # gradients that are all zero would pass too


def test_peephole_kernel_gradcheck_fp64():
    torch.manual_seed(0)
    T, B, H = 4, 2, 3
    args = [torch.randn(T, B, 4 * H), torch.randn(4 * H, H) * 0.5, torch.randn(3, H), torch.randn(B, H), torch.randn(B, H)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(PeepholeLayer.apply, args)


def test_sequential_scan_gradcheck_fp64():
    torch.manual_seed(0)
    a, b, h0 = torch.rand(5, 2, 3).double(), torch.randn(5, 2, 3).double(), torch.randn(2, 3).double()
    assert torch.autograd.gradcheck(_SequentialScan.apply, [t.requires_grad_() for t in (a, b, h0)])


def test_log_scan_gradcheck_fp64():
    torch.manual_seed(0)
    log_a, log_b, h0 = -torch.rand(2, 5, 3).double(), torch.randn(2, 5, 3).double(), torch.randn(2, 3).double()
    assert torch.autograd.gradcheck(log_scan, [t.requires_grad_() for t in (log_a, log_b, h0)])


def test_the_two_scans_agree_and_carry_over_windows():
    """The parallel scan over two windows, the state carried, equals the plain recurrence over both."""
    torch.manual_seed(0)
    log_a, log_b, h0 = -torch.rand(2, 20, 4) * 3, torch.randn(2, 20, 4), torch.randn(2, 4)
    h, reference = h0, []
    for t in range(20):
        h = log_a[:, t].exp() * h + log_b[:, t].exp()
        reference.append(h)
    reference = torch.stack(reference, dim=1)
    first = log_scan(log_a[:, :12], log_b[:, :12], h0)
    second = log_scan(log_a[:, 12:], log_b[:, 12:], first[:, -1])
    torch.testing.assert_close(torch.cat([first, second], dim=1), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sequential_scan(log_a.exp(), log_b.exp(), h0), reference, atol=1e-5, rtol=1e-5)


def test_the_scan_is_chosen_by_device():
    assert pick_scan("auto", torch.device("cpu")) == "sequential"
    assert pick_scan("auto", torch.device("cuda")) == "log"
    assert pick_scan("log", torch.device("cpu")) == "log"
    with pytest.raises(ValueError, match="scan must be one of"):
        pick_scan("fast", torch.device("cpu"))


def test_forget_bias_starts_the_forget_gates_bias():
    for name, blocks in (("lstm", ("bias_ih_l1", "bias_hh_l1")), ("peephole", ("bias_l1",)), ("minlstm", ("bias_l1",))):
        model = CharRNN(ModelConfig(cell=name, num_layers=2, rnn_size=8, embed_size=4, vocab_size=5, forget_bias=2.5))
        block = model.rnn.forget_block
        first = getattr(model.rnn, blocks[0])[block * 8 : (block + 1) * 8]
        assert torch.equal(first, torch.full((8,), 2.5)), name
        if len(blocks) > 1:  # nn.LSTM adds b_ih and b_hh: the second is zeroed so the sum is the value
            assert torch.equal(getattr(model.rnn, blocks[1])[8:16], torch.zeros(8))
        other = getattr(model.rnn, blocks[0])[: block * 8] if block else getattr(model.rnn, blocks[0])[8:]
        assert not torch.equal(other, torch.full_like(other, 2.5))  # only the forget block
    torch.manual_seed(0)
    gru = CharRNN(ModelConfig(cell="gru", num_layers=1, rnn_size=8, embed_size=4, vocab_size=5, forget_bias=2.5))
    torch.manual_seed(0)
    plain = CharRNN(ModelConfig(cell="gru", num_layers=1, rnn_size=8, embed_size=4, vocab_size=5, forget_bias=0.0))
    assert all(torch.equal(a, b) for a, b in zip(gru.parameters(), plain.parameters()))  # no forget gate: nothing set


def test_forget_bias_flag_is_recorded_and_checked(tmp_path, text_file):
    out = tmp_path / "run"
    r = run("train", text_file, "--out", out, "--forget-bias", "0", "--max-steps", "2", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads(run("info", out / "last.safetensors", "--json").stdout)["model"]["forget_bias"] == 0.0
    r = run("train", text_file, "--out", tmp_path / "bad", "--forget-bias", "1e9", "--max-steps", "2", *FAST)
    assert r.exit_code == 1 and "forget_bias must be between -100 and 100" in r.stderr


@pytest.mark.parametrize("name", cell_names())
def test_resume_continues_exactly_for_every_cell(tmp_path, prepared, name):
    straight = train_small(prepared, tmp_path / "straight", name, max_steps=8)
    train_small(prepared, tmp_path / "half", name, max_steps=4)
    from charlm.config import TrainConfig  # noqa: F401  (the resumed run's options come from the checkpoint)
    from charlm.training.trainer import Trainer
    from tests.conftest import small_configs

    model_cfg, cfg = small_configs(name, max_steps=8)
    resumed = Trainer(model_cfg, cfg, prepared, tmp_path / "half", resume=checkpoint.load(tmp_path / "half" / "last.safetensors"))
    resumed.run()
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


def test_an_ensemble_of_every_cell_samples_beams_and_evaluates(tmp_path, text_file):
    runs = []
    for name in cell_names():
        out = tmp_path / name
        r = run("train", text_file, "--cell", name, "--out", out, "--max-steps", "6", "--eval-every", "6", *FAST)
        assert r.exit_code == 0, r.output
        runs.append(out / "best.safetensors")
    r = run("eval", *runs, "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["members"]) == len(runs), r.output
    r = run("sample", *runs, "--length", "30", "--seed", "1", "--prime", "The ")
    assert r.exit_code == 0 and r.stdout.startswith("The ") and len(r.stdout) == 4 + 30 + 1, r.output
    r = run("beam", *runs, "--prime", "The ", "--length", "8", "--beam-width", "3", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["text"].startswith("The "), r.output
