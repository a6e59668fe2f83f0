import copy
import hashlib
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import small_configs, train_small

from charlm import CharlmError, checkpoint, config
from charlm.cli.stop import StopRequests
from charlm.config import TrainConfig
from charlm.devices import cpu_has_bf16
from charlm.training.schedule import learning_rate
from charlm.training.trainer import Trainer, TrainingStopped


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_hidden_state_is_carried_between_windows(tmp_path, prepared):
    """Per-window training losses equal a single forward over whole rows: breaks if the state is reset."""
    model_cfg, cfg = small_configs(lr=1e-12, max_steps=4, log_every=1)  # lr ~ 0: weights stay put
    model_cfg.forget_bias = 3.0  # forget gates open from the start: the state's effect is far above the tolerance below
    records = []
    trainer = Trainer(model_cfg, cfg, prepared, tmp_path / "run", report=lambda k, r: records.append(r) if k == "train" else None)
    initial = copy.deepcopy(trainer.model).eval()
    trainer.run()
    b = trainer.batcher
    x = torch.cat([b.window(k)[0] for k in range(4)], dim=1)  # (B, 4T): the rows as one stretch
    y = torch.cat([b.window(k)[1] for k in range(4)], dim=1)
    with torch.no_grad():
        logits, _ = initial(x)
    per_pos = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, 4T)
    T = cfg.seq_length
    expected = [float(per_pos[:, k * T : (k + 1) * T].mean()) / math.log(2) for k in range(4)]
    got = [r["train_bpc"] for r in records]
    assert got == pytest.approx(expected, rel=1e-4)
    # The same windows scored with the state reset each time differ: the test can tell.
    with torch.no_grad():
        reset = [
            F.cross_entropy(initial(x[:, k * T : (k + 1) * T])[0].transpose(1, 2), y[:, k * T : (k + 1) * T]) for k in range(4)
        ]
    assert float(reset[3]) / math.log(2) != pytest.approx(expected[3], rel=1e-3)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_exact_resume(tmp_path, prepared, cell):
    """N steps, stop (Ctrl-C), resume for N more == 2N straight; dropout on, so the RNG must be restored too."""
    n = 7
    model_cfg, cfg = small_configs(cell, max_steps=2 * n, schedule="cosine", warmup_steps=3, log_every=1)
    model_cfg.dropout = 0.2
    straight = Trainer(copy.deepcopy(model_cfg), copy.deepcopy(cfg), prepared, tmp_path / "straight")
    straight.run()

    asked = []

    def stop_at_n(kind, record):
        if kind == "train" and record["step"] == n:
            asked.append("SIGINT")

    first = Trainer(
        copy.deepcopy(model_cfg),
        copy.deepcopy(cfg),
        prepared,
        tmp_path / "split",
        report=stop_at_n,
        stop=lambda: asked[0] if asked else None,
    )
    with pytest.raises(TrainingStopped):
        first.run()
    last = checkpoint.load(tmp_path / "split" / "last.safetensors")
    assert last.meta["train_state"]["step"] == n
    resumed = Trainer(copy.deepcopy(model_cfg), copy.deepcopy(cfg), prepared, tmp_path / "split", resume=last)
    resumed.run()
    a, b = params(straight.model), params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.progress.step == straight.progress.step == 2 * n


def test_resume_changes_nothing_when_it_should_differ(tmp_path, prepared):
    """Guard for the resume test: without the restored optimizer state the result differs."""
    model_cfg, cfg = small_configs(max_steps=10)
    straight = Trainer(copy.deepcopy(model_cfg), copy.deepcopy(cfg), prepared, tmp_path / "a")
    straight.run()
    cfg5 = copy.deepcopy(cfg)
    cfg5.max_steps = 5
    Trainer(copy.deepcopy(model_cfg), cfg5, prepared, tmp_path / "b").run()
    init = checkpoint.load(tmp_path / "b" / "last.safetensors")
    cfg5.max_steps = 5
    weights_only = Trainer(copy.deepcopy(model_cfg), cfg5, prepared, tmp_path / "c", init_from=init)
    weights_only.run()
    a, b = params(straight.model), params(weights_only.model)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_training_reduces_loss_and_writes_outputs(tmp_path, prepared):
    trainer = train_small(prepared, tmp_path / "run", max_steps=60, eval_every=30, lr=2e-2)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_bpc"] for r in lines if r["kind"] == "val"]
    assert len(vals) == 2 and vals[-1] < math.log2(len(prepared.vocab)) - 1
    best = checkpoint.load(tmp_path / "run" / "best.safetensors")
    assert not best.train_tensors()  # the shareable file carries no training state
    assert checkpoint.load(tmp_path / "run" / "last.safetensors").train_tensors()
    assert best.meta["metrics"]["best_val_bpc"] == pytest.approx(min(vals))
    assert trainer.progress.step == 60


def test_nan_loss_stops_and_keeps_best(tmp_path, prepared):
    model_cfg, cfg = small_configs(max_steps=50, eval_every=10, log_every=5)
    out = tmp_path / "run"
    holder = {}

    def poison(kind, record):
        if kind == "saved" and record["step"] == 10:
            holder["best"] = digest(out / "best.safetensors")
            holder["last"] = digest(out / "last.safetensors")
            with torch.no_grad():
                trainer.model.head.bias.fill_(float("nan"))

    trainer = Trainer(model_cfg, cfg, prepared, out, report=poison)
    with pytest.raises(TrainingStopped, match="became nan.*intact"):
        trainer.run()
    assert digest(out / "best.safetensors") == holder["best"]
    assert digest(out / "last.safetensors") == holder["last"]


@pytest.mark.parametrize(
    "signame, said", [("SIGINT", "interrupted"), ("SIGTERM", "stopped by SIGTERM"), ("SIGHUP", "stopped by SIGHUP")]
)
def test_stop_signals_save_a_resumable_checkpoint(tmp_path, prepared, signame, said):
    model_cfg, cfg = small_configs(max_steps=100, eval_every=1000, log_every=1)
    out = tmp_path / "run"
    sig = getattr(signal, signame)

    def interrupt(kind, record):
        if kind == "train" and record["step"] == 6:
            os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)  # e.g. default_int_handler, or SIG_IGN in a background job
    with StopRequests() as stop:
        trainer = Trainer(model_cfg, cfg, prepared, out, report=interrupt, stop=stop)
        with pytest.raises(TrainingStopped, match=f"{said} at step 6.*--resume"):
            trainer.run()
    last = checkpoint.load(out / "last.safetensors")
    assert last.meta["train_state"]["step"] == 6
    assert signal.getsignal(sig) is before  # the handler is given back


def test_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 10, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(0.55)
    assert learning_rate(cfg, 100, 1.0) == pytest.approx(0.1)
    step = TrainConfig(lr=1.0, schedule="step", lr_decay=0.5, decay_every=100)
    assert [learning_rate(step, s, 0) for s in (0, 99, 100, 250)] == [1.0, 1.0, 0.5, 0.25]
    assert learning_rate(TrainConfig(lr=0.3), 10**6, 1.0) == 0.3


def test_time_budget_stops_training(tmp_path, prepared):
    trainer = train_small(prepared, tmp_path / "run", time_budget=1.0)
    assert 0 < trainer.progress.step and trainer.progress.elapsed >= 1.0


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16: charlm refuses --dtype bf16 here")
def test_bf16_runs_the_recurrent_kernel_in_bf16(tmp_path, prepared):
    """Not just the flag: the recurrent kernel and the head product receive bf16 operands, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class DtypeLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.setdefault(func.__name__.split(".")[0], set()).update(dtypes)
            return func(*args, **(kwargs or {}))

    model_cfg, cfg = small_configs(max_steps=2, dtype="bf16")
    trainer = Trainer(model_cfg, cfg, prepared, tmp_path / "run")
    with DtypeLog() as log:
        trainer.step(torch.zeros(()))
    rnn_ops = {k: v for k, v in log.seen.items() if "rnn" in k}
    assert rnn_ops, f"no recurrent kernel seen: {sorted(log.seen)}"
    assert all(v == {torch.bfloat16} for v in rnn_ops.values()), rnn_ops
    assert any("backward" in k for k in rnn_ops)
    assert trainer.model.head.weight.dtype == torch.float32  # fp32 master weights


def test_compile_trains_through_torch_compile_and_saves_plain_weights(tmp_path, prepared, monkeypatch):
    # A spy stands in for torch.compile (a real compile takes minutes on CPU): it must wrap the
    # module that trains, while checkpoints keep the model's own parameter names.
    compiled = []

    def spy(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", spy)
    trainer = train_small(prepared, tmp_path / "run", compile=True, max_steps=3)
    assert compiled and compiled[0] is trainer.model
    assert set(checkpoint.load(tmp_path / "run" / "last.safetensors").model_state()) == set(trainer.model.state_dict())
    with pytest.raises(CharlmError, match="option compile expects bool"):
        config.resolve({"compile": "yes"})
    # a checkpoint's saved config (resume) carries compile as a JSON bool
    assert config.resolve(base={"model": {}, "train": {"compile": False}})[1].compile is False
