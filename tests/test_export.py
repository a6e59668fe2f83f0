"""`charlm export`: the ONNX step graph against charlm's decoder, the torch-free generator against
`charlm sample`, ensembles, the stored dtypes, the metadata, and the refusals.

Models are tiny and trained once per module (a few seconds per cell), long enough that greedy text
is words, not one repeated symbol. Every registered cell is exported: the graph is built from the
cell contract's `layer_step`, so a cell registered later is covered the moment it exists.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="charlm export needs onnx, onnxscript and onnxruntime: pip install -e '.[export]'")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript: pip install -e '.[export]'")

import onnx  # noqa: E402
import torch  # noqa: E402
from conftest import assert_clean_error, make_text, run, train_small  # noqa: E402
from torch import nn  # noqa: E402

import charlm  # noqa: E402
import charlm.cli.export  # noqa: E402,F401  (registers the command)
from charlm.cells import Cell, cell_names, register, unregister  # noqa: E402
from charlm.data import PreparedData  # noqa: E402
from charlm.data import prepare as prep  # noqa: E402
from charlm.export import build, export, load_for_export, read_metadata  # noqa: E402
from charlm.export.check import kl, session, step_both  # noqa: E402
from charlm.export.storage import BOUNDS, compress  # noqa: E402
from charlm.tokenizers.spm import TokenizerSpec  # noqa: E402

STEPS = 1000  # steps compared with the state carried (the figure)
GREEDY_CHARS = 300
TRAIN = dict(max_steps=150, lr=1e-2, batch_size=8, seq_length=32)  # greedy text that is words, in ~1 s per cell


# -- the models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_CORPORA_DIR", str(root / "corpora"))
        (root / "corpora").mkdir()
        (root / "tiny.txt").write_text(make_text())
        prep.prepare([root / "tiny.txt"], root / "prepared")
    return root


@pytest.fixture(scope="module")
def checkpoints(workdir) -> dict[str, Path]:
    """cell -> best.safetensors of a tiny model of that cell, trained on demand (once per module)."""

    class Trained(dict):
        def __missing__(self, cell: str) -> Path:
            train_small(PreparedData(workdir / "prepared"), workdir / f"run-{cell}", cell=cell, **TRAIN)
            self[cell] = workdir / f"run-{cell}" / "best.safetensors"
            return self[cell]

    return Trained()


def text_ids(lm, streams: int = 2) -> np.ndarray:
    """(STEPS, streams) ids of the training-like text, each stream from another offset."""
    ids = lm.vocab.encode(make_text(STEPS * streams * 8, seed=5))  # a SentencePiece piece spans several characters
    return np.stack([ids[s * STEPS : (s + 1) * STEPS] for s in range(streams)], axis=1)


def figures(graph_bytes: bytes, lm, specs) -> tuple[float, float]:
    """Over STEPS steps of text, state carried: the largest |log-prob difference| between onnxruntime and
    charlm's decoder, and the mean KL divergence from charlm's distribution to the graph's (nats)."""
    diffs, kls = [], []
    for got, want in step_both(session(graph_bytes), lm, specs, text_ids(lm)):
        diffs.append(float(np.abs(got - want).max()))
        kls.append(kl(want, got))
    return max(diffs), float(np.concatenate(kls).mean())


def max_diff(graph_bytes: bytes, lm, specs) -> float:
    return figures(graph_bytes, lm, specs)[0]


# -- the graph against charlm --------------------------------------------------------------------
@pytest.mark.parametrize("cell", cell_names())
def test_step_graph_equals_charlm_over_1000_steps(cell, checkpoints):
    """fp32: onnxruntime's log-probs within 1e-4 of charlm's decoder at every step; fp16 and int8
    weights within their stated bounds (storage.BOUNDS, docs/export.md)."""
    lm = load_for_export([checkpoints[cell]])
    graph = build(lm, "fp32", check_steps=20)
    assert graph.check.max_abs_diff <= 1e-4
    fp32 = graph.model.SerializeToString()
    assert max_diff(fp32, lm, graph.states) <= 1e-4
    for dtype in ("fp16", "int8"):
        stored = compress(onnx.load_from_string(fp32), dtype)
        worst, mean_kl = figures(stored.SerializeToString(), lm, graph.states)
        assert worst <= BOUNDS[dtype][0] and mean_kl <= BOUNDS[dtype][1], (dtype, worst, mean_kl)


def test_batch_dimension_is_dynamic(checkpoints):
    """One graph steps 1, 5 or 64 streams, and a stream's log-probs do not depend on its neighbours."""
    lm = load_for_export([checkpoints["lstm"]])
    graph = build(lm, check_steps=5)
    sess = session(graph.model.SerializeToString())
    ids = np.arange(64) % len(lm.vocab)
    outs = {}
    for B in (1, 5, 64):
        feeds = {s.input: np.zeros((s.layers, B, s.size), np.float32) for s in graph.states}
        outs[B] = sess.run(None, {"ids": ids[:B].astype(np.int64), **feeds})[0]
        assert outs[B].shape == (B, len(lm.vocab))
    np.testing.assert_allclose(outs[64][:5], outs[5], atol=1e-6)
    np.testing.assert_allclose(outs[5][:1], outs[1], atol=1e-6)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.model.graph.input}
    assert inputs == {"ids": ["batch"], "h": [2, "batch", 32], "c": [2, "batch", 32]}


@pytest.mark.parametrize("combine,weights", [("mean", None), ("geometric", [0.7, 0.3])])
def test_ensemble_combined_in_the_graph(combine, weights, checkpoints):
    """Two members of different cells, one graph: the mixture's log-probs equal charlm's Ensemble step for step."""
    lm = load_for_export([checkpoints["lstm"], checkpoints["gru"]], weights=weights, combine=combine)
    graph = build(lm, check_steps=20)
    assert [s.input for s in graph.states] == ["m0_h", "m0_c", "m1_h"]
    assert max_diff(graph.model.SerializeToString(), lm, graph.states) <= 1e-4
    ensemble = json.loads(graph.metadata["charlm.ensemble"])
    assert ensemble["combine"] == combine and ensemble["members"] == 2
    assert math.isclose(sum(ensemble["weights"]), 1.0)


# -- the torch-free generator ----------------------------------------------------------------------
# Runs generate.py with torch and charlm made unimportable (a finder first in sys.meta_path), and
# reports at exit every attempt to import either and whether either is loaded.
NO_TORCH = r"""
import atexit, importlib.abc, runpy, sys
BLOCKED, tried = ("torch", "charlm"), []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"{name} is blocked: the generator must not need it")
sys.meta_path.insert(0, Block())
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
atexit.register(lambda: sys.stderr.write(f"\nIMPORT-CHECK tried={tried} loaded={loaded()}\n"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def torch_free(script: Path, *args) -> str:
    """generate.py's stdout, run with torch blocked; fails if it tried to import torch or charlm."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    r = subprocess.run(
        [sys.executable, "-I", "-c", NO_TORCH, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "IMPORT-CHECK tried=[] loaded=[]" in r.stderr, r.stderr
    return r.stdout


def exported(tmp_path, *ckpts, dtype="fp32", **kw) -> Path:
    """Export through the CLI into a folder, then move the folder elsewhere: it must stand alone."""
    out = tmp_path / "made"
    r = run("export", *ckpts, "--onnx", out, "--dtype", dtype, *[a for k, v in kw.items() for a in (f"--{k}", v)])
    assert r.exit_code == 0, r.output
    assert "checked: onnxruntime's log-probs within" in r.stderr and "generate.py" in r.stderr
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)
    return moved / "generate.py"


@pytest.mark.parametrize("cell", cell_names())
def test_generate_py_greedy_equals_charlm_sample(cell, checkpoints, tmp_path):
    ckpt = checkpoints[cell]
    script = exported(tmp_path, ckpt)
    want = run("sample", ckpt, "--greedy", "--length", GREEDY_CHARS, "--prime", "The quick")
    assert want.exit_code == 0, want.output
    got = torch_free(script, "--greedy", "--length", GREEDY_CHARS, "--prime", "The quick")
    assert got == want.stdout
    assert len(set(got)) > 3  # words, not one symbol repeated


def test_generate_py_ensemble_and_no_prime(checkpoints, tmp_path):
    ckpts = [checkpoints["lstm"], checkpoints["gru"]]
    script = exported(tmp_path, *ckpts, weights="0.6,0.4")
    want = run("sample", *ckpts, "--weights", "0.6,0.4", "--greedy", "--length", GREEDY_CHARS)
    assert want.exit_code == 0, want.output
    assert torch_free(script, "--greedy", "--length", GREEDY_CHARS) == want.stdout


def test_generate_py_sampling_equals_charlm_with_the_same_seed(checkpoints, tmp_path):
    """Same RNG (random.Random(seed)), same processors and draw: the same text (both on this machine:
    a draw within ~1e-7 of a boundary could differ elsewhere, which is why greedy is the guarantee)."""
    ckpt = checkpoints["lstm"]
    script = exported(tmp_path, ckpt)
    for flags in (
        ["--seed", 3, "--temperature", 0.8],
        ["--seed", 2**40 + 7, "--top-k", 5, "--top-p", 0.9],
        ["--seed", 9, "--num-samples", 3],
    ):
        want = run("sample", ckpt, "--length", 200, "--prime", "Over", *flags)
        assert want.exit_code == 0, want.output
        assert torch_free(script, "--length", 200, "--prime", "Over", *flags) == want.stdout, flags


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_stored_dtypes_are_smaller_and_generate(dtype, checkpoints, tmp_path):
    ckpt = checkpoints["gru"]
    script = exported(tmp_path / dtype, ckpt, dtype=dtype)
    full = exported(tmp_path / "fp32", ckpt)
    weights = full.parent.joinpath("model.onnx").stat().st_size
    assert script.parent.joinpath("model.onnx").stat().st_size < weights * (0.75 if dtype == "fp16" else 0.6)
    meta = read_metadata(script.parent / "model.onnx")
    assert meta["dtype"] == dtype and (meta["check"]["bound"], meta["check"]["kl_bound"]) == BOUNDS[dtype]
    assert len(torch_free(script, "--greedy", "--length", 100)) == 101


def test_error_lines_of_the_generator(checkpoints, tmp_path):
    script = exported(tmp_path, checkpoints["lstm"])
    r = subprocess.run([sys.executable, str(script), "--prime", "∮ unknown", "--length", "5"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: 1 character(s) not in the model's vocabulary: '∮'"), r.stderr
    r = subprocess.run([sys.executable, str(script), "--temperature", "0"], capture_output=True, text=True)
    assert r.returncode == 1 and "--greedy" in r.stderr
    r = subprocess.run(
        [sys.executable, str(script), "--prime", "∮ Over", "--unknown", "skip", "--greedy", "--length", "20"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.startswith("∮ Over")


# -- the file alone is enough ----------------------------------------------------------------------
def test_metadata_makes_the_file_self_describing(checkpoints, tmp_path):
    script = exported(tmp_path, checkpoints["peephole"])
    meta = read_metadata(script.parent / "model.onnx")
    lm = charlm.load(checkpoints["peephole"], device="cpu")
    assert meta["format"] == "charlm-onnx-step" and meta["version"] == charlm.__version__
    assert meta["vocab"] == lm.vocab.to_meta()
    assert meta["tokenizer"]["symbols"] == [lm.vocab.symbol(i) for i in range(len(lm.vocab))]
    assert meta["members"][0]["model"] == lm.info[0]["model"] and meta["members"][0]["metrics"] == lm.info[0]["metrics"]
    assert "source_paths" not in meta["members"][0]["provenance"]  # paths of the training machine stay there
    assert meta["states"] == [
        {"input": "h", "output": "h_out", "member": 0, "name": "h", "layers": 2, "size": 32},
        {"input": "c", "output": "c_out", "member": 0, "name": "c", "layers": 2, "size": 32},
    ]
    assert meta["check"]["max_abs_diff"] <= 1e-4 and meta["check"]["steps"] >= 100
    model = onnx.load(str(script.parent / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture(scope="module")
def other_vocabularies(workdir) -> dict[str, Path]:
    """A byte-vocabulary model and a SentencePiece (bpe) one, on text with characters outside ASCII."""
    text = make_text(12000, seed=2).replace("fox", "föx").replace("dog", "dög €")
    (workdir / "utf8.txt").write_text(text)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_CORPORA_DIR", str(workdir / "corpora"))
        for name, kwargs in (("bytes", {"encoding": "bytes"}), ("bpe", {"tokenizer": TokenizerSpec("bpe", 60)})):
            prep.prepare([workdir / "utf8.txt"], workdir / f"prepared-{name}", **kwargs)
            train_small(PreparedData(workdir / f"prepared-{name}"), workdir / f"run-{name}", **TRAIN)
            out[name] = workdir / f"run-{name}" / "best.safetensors"
    return out


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_byte_and_sentencepiece_vocabularies(kind, other_vocabularies, tmp_path):
    """Pieces that are bytes decode incrementally, as charlm's stream decoder; a SentencePiece prime is
    encoded with the tokenizer model from the metadata (the sentencepiece package, never torch)."""
    ckpt = other_vocabularies[kind]
    script = exported(tmp_path, ckpt)
    for prime in ("", "Seven föx"):
        want = run("sample", ckpt, "--greedy", "--length", 200, "--prime", prime)
        assert want.exit_code == 0, want.output
        assert torch_free(script, "--greedy", "--length", 200, "--prime", prime) == want.stdout
    lm = load_for_export([ckpt])
    graph = build(lm, check_steps=10)
    assert max_diff(graph.model.SerializeToString(), lm, graph.states) <= 1e-4


# -- refusals ------------------------------------------------------------------------------------
def test_clean_errors(checkpoints, tmp_path):
    ckpt = checkpoints["lstm"]
    assert_clean_error(run("export", ckpt), r"--onnx DIR, --web DIR, or both")
    assert_clean_error(
        run("export", ckpt, "--onnx", tmp_path / "o", "--dtype", "bf16"), r"--dtype must be one of fp32, fp16, int8"
    )
    assert_clean_error(run("export", ckpt, "--onnx", tmp_path / "o", "--ort-dist", tmp_path), r"--ort-dist goes with --web")
    assert_clean_error(
        run("export", ckpt, "--web", tmp_path / "w", "--ort-dist", tmp_path), r"lacks onnxruntime-web's ort.min.js.*npm install"
    )
    assert_clean_error(run("export", tmp_path / "missing.safetensors", "--onnx", tmp_path / "o"), r"missing.safetensors")
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_a_failed_check_writes_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(BOUNDS, "fp32", (0.0, 1.0))
    r = run("export", checkpoints["lstm"], "--onnx", tmp_path / "o")
    assert_clean_error(r, r"parts from charlm at step 1: log-probs differ by .* nothing was written")
    assert not (tmp_path / "o").exists()


class DataDependent(Cell):
    """A cell whose step branches on a value: torch.export cannot trace it, so it has no ONNX step."""

    name = "branchy"
    state_names = ("h",)

    def __init__(self, input_size, hidden_size, num_layers, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(hidden_size, self.layer_input_size(k)) * 0.1) for k in range(num_layers)
        )

    def layer_step(self, k, x, state):
        h = torch.tanh(x @ self.w[k].t() + state[0])
        if float(h.detach().sum()) > 1e9:  # a Python branch on a tensor's value
            h = h * 0
        return h, (h,), {"hidden": h}


def test_a_cell_that_cannot_be_expressed_is_refused_with_the_reason(workdir, tmp_path):
    register(DataDependent)
    try:
        train_small(PreparedData(workdir / "prepared"), tmp_path / "run", cell="branchy", max_steps=2)
        r = run("export", tmp_path / "run" / "best.safetensors", "--onnx", tmp_path / "o")
        assert_clean_error(r, r"cell branchy cannot be exported as an ONNX step: ")
        assert not (tmp_path / "o").exists()
    finally:
        unregister("branchy")


def test_library_entry_point(checkpoints, tmp_path):
    """charlm.export.export: both folders from one build; the page's files, its model.json."""
    result = export([checkpoints["rnn"]], onnx=tmp_path / "o", web=tmp_path / "w", dtype="fp16")
    assert {p.name for p in result.onnx_files} == {"model.onnx", "generate.py"}
    assert {p.name for p in result.web_files} == {"model.onnx", "model.json", "index.html", "app.js"}
    assert result.ort_source and result.ort_source.startswith("https://cdn.jsdelivr.net/npm/onnxruntime-web@")
    html = (tmp_path / "w" / "index.html").read_text()
    assert f'src="{result.ort_source}ort.min.js"' in html and "__ORT" not in html
    page = json.loads((tmp_path / "w" / "model.json").read_text())
    assert page["dtype"] == "fp16" and page["tokenizer"]["kind"] == "char" and page["states"][0]["input"] == "h"
    assert (tmp_path / "o" / "model.onnx").read_bytes() == (tmp_path / "w" / "model.onnx").read_bytes()
