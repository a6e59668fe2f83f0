"""--dtype auto (devices.resolve_dtype), the presets on CPUs with and without bf16, and the machine in one line."""

import json

import pytest
import torch
from conftest import small_configs

import charlm.cli.env  # noqa: F401  (registers the env command on the app)
from charlm import CharlmError, checkpoint, config, devices, machine
from charlm.cli import app
from charlm.training.trainer import Trainer

CPU = torch.device("cpu")
REAL_BF16 = devices.cpu_has_bf16()


@pytest.fixture(params=[False, True], ids=["no-bf16", "bf16"])
def bf16(request, monkeypatch):
    """This CPU as one reported without native bf16, and as one with it."""
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: request.param)
    return request.param


def test_auto_resolves_per_use(bf16):
    picks = {use: devices.resolve_dtype(CPU, use) for use in devices.USES}
    if bf16:
        assert picks == {"train": "bf16", "step": "int8", "batch": "bf16", "ensemble": "int8", "eval": "fp32"}
    else:
        assert set(picks.values()) == {"fp32"}
    devices.check_dtype(CPU, "auto")  # never refused: it resolves to what the CPU runs
    for dtype in picks.values():
        devices.check_dtype(CPU, dtype)


def test_a_cpu_without_bf16_still_refuses_an_explicit_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    with pytest.raises(CharlmError, match="needs a CPU with bf16"):
        devices.check_dtype(CPU, "bf16")


def test_an_unknown_use_is_a_clear_error():
    with pytest.raises(CharlmError, match="train, step, batch, ensemble, eval"):
        devices.resolve_dtype(CPU, "decode")


@pytest.mark.parametrize("name", config.list_presets())
def test_every_preset_loads_on_both_cpus(bf16, name):
    model_cfg, train_cfg = config.resolve(config.load_preset(name))
    assert train_cfg.dtype == "auto"
    devices.check_dtype(CPU, train_cfg.dtype)
    assert devices.resolve_dtype(CPU, "train") == ("bf16" if bf16 else "fp32")
    assert "shakespeare-cpu-fp32" not in config.list_presets()  # folded into shakespeare-cpu


@pytest.mark.parametrize(
    "fake",
    [False, pytest.param(True, marks=pytest.mark.skipif(not REAL_BF16, reason="bf16 training needs a CPU with bf16"))],
    ids=["no-bf16", "bf16"],
)
def test_the_chosen_dtype_is_in_the_checkpoint(tmp_path, prepared, monkeypatch, fake):
    """3 steps with dtype auto: the start-up report says what auto chose; the checkpoint keeps auto in
    its config (a resume elsewhere chooses again) and the choice in its provenance."""
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: fake)
    monkeypatch.setenv("CHARLM_THREADS", "1")
    model_cfg, cfg = small_configs(dtype="auto", max_steps=3, eval_every=3)
    starts = []
    trainer = Trainer(
        model_cfg, cfg, prepared, tmp_path / "run", report=lambda kind, info: starts.append(info) if kind == "start" else None
    )
    trainer.run()
    chosen = "bf16" if fake else "fp32"
    assert trainer.dtype == chosen
    assert len(starts) == 1 and starts[0]["dtype"] == chosen and f"{chosen} (auto)" in starts[0]["device"]
    assert starts[0]["threads"] == 1 and "1 thread" in starts[0]["device"]
    for name in ("last.safetensors", "best.safetensors"):
        meta = checkpoint.load(tmp_path / "run" / name).meta
        assert meta["train"]["dtype"] == "auto"
        assert meta["provenance"]["dtype"] == chosen and meta["provenance"]["threads"] == 1


def test_isa_levels_from_flags():
    assert machine.isa_level({"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}) == "AMX"
    assert machine.isa_level({"avx", "avx2", "fma", "avx512f", "avx512_bf16"}) == "AVX-512 BF16"
    assert machine.isa_level({"avx", "avx2", "fma", "avx512f"}) == "AVX-512"
    assert machine.isa_level({"avx", "avx2", "fma"}) == "AVX2"


def test_the_machine_in_one_line(bf16):
    line = machine.describe()
    assert "\n" not in line
    for part in ("charlm ", "torch ", "CPU ", "cores", "threads", "GPU ", "auto on "):
        assert part in line, line
    assert ("train bf16" if bf16 else "train fp32") in line and "eval fp32" in line


def test_env_command_prints_it(monkeypatch):
    monkeypatch.setenv("CHARLM_THREADS", "2")
    from typer.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 1 and "auto on" in r.stdout and "threads 2" in r.stdout
    r = runner.invoke(app, ["env", "--json"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert facts["threads"]["charlm_would_use"] == 2 and facts["threads"]["explicit"]
    assert facts["auto"]["eval"] == "fp32" and facts["cpu"]["isa"]
