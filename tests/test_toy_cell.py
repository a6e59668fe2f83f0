"""Adding a cell is one class plus its registration: a tanh RNN written here from its equations
(no fused kernel, no decoder of its own) trains, samples, beam-searches, evaluates and joins an
ensemble through the CLI with no other change to charlm."""

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from charlm.cells import Cell, cell_names, register, unregister
from charlm.cli import app

runner = CliRunner()
FAST = ["--rnn-size", "24", "--embed-size", "8", "--batch-size", "4", "--seq-length", "12", "--device", "cpu"]


class ToyTanh(Cell):
    """h' = tanh(W x + U h + b), nothing else: the contract's defaults do the rest."""

    name = "toytanh"
    state_names = ("h",)

    def __init__(self, input_size, hidden_size, num_layers, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(hidden_size, self.layer_input_size(k)) / math.sqrt(hidden_size)) for k in range(num_layers)
        )
        self.u = nn.ParameterList(
            nn.Parameter(torch.randn(hidden_size, hidden_size) / math.sqrt(hidden_size)) for _ in range(num_layers)
        )
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(hidden_size)) for _ in range(num_layers))

    def layer_step(self, k, x, state):
        h = torch.tanh(x @ self.w[k].t() + state[0] @ self.u[k].t() + self.b[k])
        return h, (h,), {"hidden": h}


@pytest.fixture
def toy():
    register(ToyTanh)
    yield ToyTanh.name
    unregister(ToyTanh.name)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_a_registered_cell_goes_through_every_command(tmp_path, text_file, toy):
    assert toy in cell_names()
    runs = []
    for seed in (1, 2):
        out = tmp_path / f"run{seed}"
        r = run("train", text_file, "--cell", toy, "--out", out, "--max-steps", "6", "--eval-every", "6", "--seed", seed, *FAST)
        assert r.exit_code == 0, r.output
        runs.append(out / "best.safetensors")
    r = run("info", runs[0], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["model"]["cell"] == toy
    r = run("sample", runs[0], "--length", "40", "--seed", "3", "--prime", "The ")
    assert r.exit_code == 0 and r.stdout.startswith("The ") and len(r.stdout) == 4 + 40 + 1, r.output
    r = run("beam", runs[0], "--prime", "The ", "--length", "10", "--beam-width", "3", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["text"].startswith("The "), r.output
    r = run("eval", runs[0], "--json")
    assert r.exit_code == 0 and 0 < json.loads(r.stdout)["bits_per_char"] < 10, r.output
    r = run("eval", *runs, "--json")  # a two-member ensemble: members step together through the equations
    assert r.exit_code == 0 and len(json.loads(r.stdout)["members"]) == 2, r.output
    r = run("sample", *runs, "--length", "20", "--seed", "1")
    assert r.exit_code == 0 and len(r.stdout) == 21, r.output


def test_an_unregistered_cell_is_a_clear_error(tmp_path, text_file):
    r = run("train", text_file, "--cell", "toytanh", "--out", tmp_path / "x", *FAST)
    assert r.exit_code == 1 and "cell must be one of" in r.stderr and "lstm" in r.stderr
