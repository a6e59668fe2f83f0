"""charlm viz: the properties, the correlations, the trace (the same bits as eval, the same internals
however the stream is cut), the page's data, every registered cell, SentencePiece, and bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, make_text, run, train_small

from charlm import CharlmError, checkpoint
from charlm.cells import cell_names
from charlm.config import ModelConfig
from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.model import CharRNN
from charlm.tokenizers.vocab import Vocab
from charlm.viz import Options, gates, predicates, surprise, trace, visualize
from charlm.viz.predicates import bracket_depth, comment, indent, line_position, pearson, quote, ranks


# -- properties of a text ------------------------------------------------------------------
def test_builtin_properties_on_small_strings():
    assert quote('a "bc" d').tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert quote('x "open\ny').tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]  # a line break ends a quote
    assert quote("\u201cab\u201d c").tolist() == [1, 1, 1, 0, 0, 0]
    assert line_position("ab\ncd").tolist() == [1, 2, 0, 1, 2]
    assert bracket_depth("a{b{c}d}e").tolist() == [0, 1, 1, 2, 2, 1, 1, 0, 0]
    assert bracket_depth("}{x").tolist() == [0, 1, 1]  # starts mid-file: shifted to 0
    assert comment("x /* c */ y").tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert comment("a // b\nc").tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert comment('s = "http://x"; /**/').tolist() == [0] * 16 + [1] * 4  # not inside a string
    assert comment("c = '/'; // z").tolist() == [0] * 9 + [1] * 4
    assert indent("\tab\n  c\nd").tolist() == [8, 8, 8, 8, 2, 2, 2, 2, 0]
    assert predicates.predicate("regex:o+").fn("foo bo").tolist() == [0, 1, 1, 0, 0, 1]
    assert predicates.predicate("re:x").fn("axa").tolist() == [0, 1, 0]


def test_predicate_names():
    assert [predicates.predicate(p).method for p in ("quote", "comment", "regex:a")] == ["point-biserial"] * 3
    assert [predicates.predicate(p).method for p in ("line-position", "bracket-depth", "indent")] == ["spearman"] * 3
    with pytest.raises(CharlmError, match="unknown --find predicate 'quotes'"):
        predicates.predicate("quotes")
    with pytest.raises(CharlmError, match="not a valid regular expression"):
        predicates.predicate("regex:(")


# -- correlations --------------------------------------------------------------------------
def test_ranks_average_ties():
    assert ranks(torch.tensor([3.0, 1, 3, 2])).tolist() == [3.5, 1, 3.5, 2]
    assert ranks(torch.tensor([5.0, 5, 5])).tolist() == [2, 2, 2]
    cols = ranks(torch.tensor([[1.0, 2], [1, 1], [0, 1]]))
    assert cols.tolist() == [[2.5, 3], [2.5, 1.5], [1, 1.5]]


def test_correlations_with_known_answers():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(500, generator=g) > 0.7).float().numpy()
    noise = torch.randn(500, 3, generator=g)
    acts = torch.stack([torch.from_numpy(y), -torch.from_numpy(y), noise[:, 0]], dim=1)
    r = predicates.correlate(acts, y, binary=True)
    assert r[0].item() == pytest.approx(1.0) and r[1].item() == pytest.approx(-1.0) and abs(r[2].item()) < 0.15
    x = noise[:, 1].double()  # point-biserial: (M1 - M0) / s * sqrt(p q), s the population std
    p = y.mean()
    expected = (x[y == 1].mean() - x[y == 0].mean()) / x.std(unbiased=False) * math.sqrt(p * (1 - p))
    assert predicates.correlate(x[:, None], y, binary=True)[0].item() == pytest.approx(expected.item(), abs=1e-9)
    counts = np.arange(500, dtype=np.float64) % 37
    monotone = torch.from_numpy(counts).exp()[:, None]  # Spearman: any increasing function is 1
    assert predicates.correlate(monotone, counts, binary=False)[0].item() == pytest.approx(1.0)
    assert pearson(torch.ones(10, 1), torch.arange(10.0))[0].item() == 0.0  # a constant cell: 0, not NaN


def test_find_ranks_the_planted_cell_first():
    text = make_text(3000, seed=2)
    target = line_position(text)
    acts = torch.randn(len(text), 2, 16, generator=torch.Generator().manual_seed(1))
    acts[:, 1, 5] = torch.from_numpy(target).sqrt()  # tracks the column, monotonically
    acts[:, 0, 3] = -torch.from_numpy(target) + torch.randn(len(text)) * 3  # tracks it less well, inversely
    top = predicates.find(acts, target, binary=False, top=3)
    assert (top[0]["layer"], top[0]["cell"], top[0]["r"]) == (1, 5, 1.0)
    assert (top[1]["layer"], top[1]["cell"]) == (0, 3) and -1 < top[1]["r"] < -0.5


# -- gates and surprise ---------------------------------------------------------------------
def test_gate_saturation_fractions():
    a = torch.full((10, 2, 3), 0.5)
    a[:, 0, 0] = 0.05  # always left-saturated
    a[:4, 1, 2] = 0.95  # right-saturated 40% of the steps
    s = gates.saturation({"g": a, "other": a}, ("g",))
    assert list(s) == ["g"]
    assert s["g"]["left"] == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert s["g"]["right"] == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.4]]


def test_surprising_spans_are_the_costly_ones():
    bits = np.ones(100)
    bits[0] = np.nan
    bits[40:44] = 9.0
    bits[80:82] = 7.0
    spans = surprise.spans("x" * 100, bits, width=4, count=2)
    # windows 78, 79 and 80 all hold both 7s (4.0 bits/char): the first is taken; nothing overlaps
    assert [(s["start"], s["end"], s["bits_per_char"]) for s in spans] == [(40, 44, 9.0), (78, 82, 4.0)]
    assert spans[0]["text"] == "xxxx"


# -- the trace ------------------------------------------------------------------------------
def _model(cell: str, vocab_size: int, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    return CharRNN(ModelConfig(cell=cell, num_layers=2, rnn_size=16, embed_size=8, vocab_size=vocab_size, dropout=0.0)).eval()


@pytest.mark.parametrize("cell", cell_names())
def test_internals_do_not_depend_on_how_the_stream_is_cut(cell):
    text = make_text(700, seed=4)
    vocab = Vocab.from_text(text)
    model = _model(cell, len(vocab))
    one = trace.run(model, vocab, text, rows=1, stream=False)  # one long unroll of the equations
    many = trace.run(model, vocab, text, rows=9, stream=False)  # nine rows from the fast forward's carried states
    fast = trace.run(model, vocab, text)  # the cell's own inspect where it has one, over the stream in one pass
    for other in (many, fast):
        assert one.acts.keys() == other.acts.keys() and set(model.rnn.gate_names) <= set(one.acts)
        for name in one.acts:
            assert other.acts[name].shape == (len(text), 2, 16)
            torch.testing.assert_close(one.acts[name], other.acts[name], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(one.bits, other.bits, rtol=1e-5, atol=1e-5)
    if cell not in ("lstm", "gru", "rnn"):  # cells whose top layer outputs its hidden state (no residual)
        return
    # the top layer's hidden output, through the head, gives the predictions shown
    with torch.inference_mode():
        logp = torch.log_softmax(model.head(many.acts["hidden"][:, -1]), dim=-1)
    np.testing.assert_allclose(logp.topk(5).values.exp().numpy(), many.top_p, atol=1e-5)


def test_bits_are_evals_bits(trained, tmp_path):
    text = make_text(2500, seed=5)
    f = tmp_path / "score.txt"
    f.write_text(text)
    ckpt = trained / "best.safetensors"
    ev = json.loads(run("eval", ckpt, "--text", f, "--json").stdout)
    r = run("viz", ckpt, "--text", f, "-o", tmp_path / "p.html", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["bits_per_char"] == pytest.approx(ev["bits_per_char"], abs=1e-4)
    assert summary["chars"] == len(text) and summary["tokens"] == len(text)


# -- the command -----------------------------------------------------------------------------
def _page_data(path) -> dict:
    html = path.read_text(encoding="utf-8")
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return json.loads(raw)


def test_viz_json_and_page(trained, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(make_text(3000, seed=6))
    out, png = tmp_path / "page.html", tmp_path / "gates.png"
    r = run(
        "viz",
        trained / "best.safetensors",
        "--text",
        text,
        "-o",
        out,
        "--find",
        "line-position",
        "--find",
        "regex:fox",
        "--top",
        "4",
        "--cell",
        "3,7",
        "--layer",
        "0",
        "--png",
        png,
        "--json",
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["show"] == "cell_tanh" and s["layers"] == 2 and s["hidden_size"] == 32 and s["truncated_from"] is None
    assert s["find"]["line-position"]["method"] == "spearman" and s["find"]["regex:fox"]["method"] == "point-biserial"
    for f in s["find"].values():
        assert len(f["top"]) == 4 and all(-1 <= c["r"] <= 1 for c in f["top"])
        rs = [abs(c["r"]) for c in f["top"]]
        assert rs == sorted(rs, reverse=True)
    assert s["cells_shown"][:2] == [{"layer": 0, "cell": 3, "why": "cell"}, {"layer": 0, "cell": 7, "why": "cell"}]
    assert len(s["cells_shown"]) == 2 + 3 + 3  # --cell, and the best 3 per --find
    assert set(s["gates"]) == {"input_gate", "forget_gate", "output_gate"}
    for g in s["gates"].values():
        assert len(g["left"]) == 2 and len(g["left"][0]) == 32
        assert all(0 <= a and 0 <= b and a + b <= 1 + 1e-6 for la, ra in zip(g["left"], g["right"]) for a, b in zip(la, ra))
    assert 0 < len(s["surprising_spans"]) <= 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = _page_data(out)
    assert data["text"] == text.read_text() and len(data["bits"]) == 3000 and data["bits"][0] == -1
    assert len(data["views"]) == 8 and len(data["top_ids"]) == 5 * 3000
    html = out.read_text()
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_text_that_looks_like_html_stays_text(trained, tmp_path):
    text = tmp_path / "t.txt"
    body = "the fox </script><script>alert(1)</script> <!-- a dog --> jumps.\n"
    text.write_text(body)
    out = tmp_path / "p.html"
    assert run("viz", trained / "best.safetensors", "--text", text, "-o", out, "--unknown", "skip").exit_code == 0
    html = out.read_text()
    assert html.count("</script>") == 2 and "alert(1)</script>" not in html
    kept = set(Vocab.from_meta(checkpoint.read_meta(trained / "best.safetensors")["vocab"]).symbol(i) for i in range(41))
    assert _page_data(out)["text"] == "".join(c for c in body if c in kept)


def test_max_chars_caps_and_says_so(trained, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(make_text(5000, seed=7))
    r = run("viz", trained / "best.safetensors", "--text", text, "-o", tmp_path / "p.html", "--max-chars", "1200", "--json")
    assert r.exit_code == 0, r.output
    assert "5,000 characters" in r.stderr and "first 1,200" in r.stderr
    s = json.loads(r.stdout)
    assert s["chars"] == 1200 and s["truncated_from"] == 5000


@pytest.mark.parametrize("cell", cell_names())
def test_every_registered_cell(prepared, tmp_path, cell):
    train_small(prepared, tmp_path / "run", cell=cell, max_steps=2)
    text = tmp_path / "t.txt"
    text.write_text(make_text(800, seed=8))
    r = run(
        "viz",
        tmp_path / "run" / "best.safetensors",
        "--text",
        text,
        "-o",
        tmp_path / "p.html",
        "--find",
        "line-position",
        "--json",
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    model_cls = type(checkpoint.load(tmp_path / "run" / "best.safetensors").build_model().rnn)
    assert set(s["gates"]) == set(model_cls.gate_names)
    assert s["show"] == ("cell_tanh" if "cell_tanh" in s["internals"] else "hidden")
    assert len(s["find"]["line-position"]["top"]) == 10
    for name in s["internals"]:
        r = run(
            "viz",
            tmp_path / "run" / "best.safetensors",
            "--text",
            text,
            "-o",
            tmp_path / "q.html",
            "--show",
            name,
            "--cell",
            "0",
            "--json",
        )
        assert r.exit_code == 0 and json.loads(r.stdout)["show"] == name, r.output


def test_sentencepiece_piece_colours_all_its_characters(tmp_path):
    from charlm.tokenizers.spm import TokenizerSpec

    src = tmp_path / "corpus.txt"
    src.write_text(make_text(30000, seed=9) + "emoji 😀 and 日本\n")
    prep.prepare([src], tmp_path / "data", tokenizer=TokenizerSpec("bpe", 300))
    train_small(PreparedData(tmp_path / "data"), tmp_path / "run", max_steps=3)
    ckpt = tmp_path / "run" / "best.safetensors"
    text = tmp_path / "t.txt"
    text.write_text(make_text(1500, seed=10) + "∮ unseen 😀\n")  # unseen characters: byte pieces
    r = run("viz", ckpt, "--text", text, "-o", tmp_path / "p.html", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    ev = json.loads(run("eval", ckpt, "--text", text, "--json").stdout)
    assert s["bits_per_char"] == pytest.approx(ev["bits_per_char"], abs=1e-4)
    assert s["chars"] == len(text.read_text()) and s["tokens"] < s["chars"]
    data = _page_data(tmp_path / "p.html")
    assert data["text"] == text.read_text()
    tok = data["char_tok"]
    assert len(tok) == s["chars"] and tok == sorted(tok) and len(set(tok)) < len(tok)  # pieces span several characters
    c = checkpoint.load(ckpt)
    t = trace.run(c.build_model(), c.vocab, text.read_text())
    acts = t.per_char("cell_tanh")
    same = [i for i in range(1, len(tok)) if tok[i] == tok[i - 1]]
    assert same and all(torch.equal(acts[i], acts[i - 1]) for i in same)


def test_library_entry_point_without_the_cli():
    text = make_text(400, seed=11)
    vocab = Vocab.from_text(text)
    summary, data, t = visualize(_model("gru", len(vocab)), vocab, text, Options(find=["quote"]))
    assert summary["find"]["quote"]["top"] == [] and summary["find"]["quote"]["positives"] == 0  # no quote in the text
    assert data["views"] and len(t.text) == 400


# -- bad input -------------------------------------------------------------------------------
BAD = [
    (["--layer", "2"], r"--layer must be between 0 and 1"),
    (["--layer", "-1"], r"--layer must be between 0 and 1"),
    (["--cell", "32"], r"--cell must be between 0 and 31"),
    (["--cell", "x"], r"--cell expects cell numbers"),
    (["--find", "brackets"], r"unknown --find predicate 'brackets'"),
    (["--find", "regex:[a-"], r"not a valid regular expression"),
    (["--show", "nope"], r"--show must be one of this cell's internals: input_gate"),
    (["--max-chars", "0"], r"--max-chars must be at least 1"),
    (["--top", "0"], r"--top must be at least 1"),
    (["--png", "g.jpg"], r"give a file name ending in .png"),
    (["--unknown", "drop"], r"--unknown must be error or skip"),
]


@pytest.mark.parametrize("args,pattern", BAD)
def test_bad_options_are_one_line(trained, tmp_path, args, pattern):
    text = tmp_path / "t.txt"
    text.write_text(make_text(300))
    args = [str(tmp_path / a) if a.endswith(".jpg") else a for a in args]
    assert_clean_error(run("viz", trained / "best.safetensors", "--text", text, "-o", tmp_path / "p.html", *args), pattern)


def test_bad_files_are_one_line(trained, tmp_path):
    ckpt = trained / "best.safetensors"
    good = tmp_path / "t.txt"
    good.write_text(make_text(300))
    bad_utf8, empty, corrupt = tmp_path / "b.txt", tmp_path / "e.txt", tmp_path / "c.safetensors"
    bad_utf8.write_bytes(b"abc\xff\xfe")
    empty.write_bytes(b"")
    corrupt.write_bytes(ckpt.read_bytes()[:500])
    out = ["-o", tmp_path / "p.html"]
    assert_clean_error(run("viz", tmp_path / "missing.safetensors", "--text", good, *out), r"missing\.safetensors")
    assert_clean_error(run("viz", corrupt, "--text", good, *out), r"c\.safetensors")
    assert_clean_error(run("viz", ckpt, "--text", tmp_path / "none.txt", *out), r"does not exist")
    assert_clean_error(run("viz", ckpt, "--text", bad_utf8, *out), r"not UTF-8")
    assert_clean_error(run("viz", ckpt, "--text", empty, *out), r"is empty")
    assert_clean_error(run("viz", ckpt, "--text", good, "-o", tmp_path / "no" / "dir" / "p.html"), r"cannot write")
    assert_clean_error(run("viz", ckpt, "--text", good, "-o", tmp_path), r"is a directory")
    unknown = tmp_path / "u.txt"
    unknown.write_text("the fox {}")
    assert_clean_error(run("viz", ckpt, "--text", unknown, *out), r"not in the model's vocabulary")


def test_viz_loads_no_training_or_corpus_code(trained, tmp_path):
    import subprocess
    import sys

    from test_layout import FORBIDDEN, PROBE

    text = tmp_path / "t.txt"
    text.write_text(make_text(200))
    commands = [["viz", str(trained / "best.safetensors"), "--text", str(text), "-o", str(tmp_path / "p.html"), "--json"]]
    out = subprocess.run([sys.executable, "-c", PROBE.format(commands=commands)], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "charlm.viz.trace" in loaded and "charlm.cli.viz" in loaded
    assert [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)] == []


def test_the_fused_cells_stream_through_their_own_inspect_in_chunks(monkeypatch):
    text = make_text(300, seed=13)
    vocab = Vocab.from_text(text)
    model = _model("lstm", len(vocab))
    assert trace.has_own_inspect(model.rnn)
    calls = []
    inspect = type(model.rnn).inspect
    monkeypatch.setattr(type(model.rnn), "inspect", lambda self, x, state: calls.append(x.shape) or inspect(self, x, state))
    monkeypatch.setattr(trace._stream, "__defaults__", (128,))  # chunks of 128 tokens: 300 = 128 + 128 + 44
    chunked = trace.run(model, vocab, text)
    assert [c[1] for c in calls] == [128, 128, 44]
    rows = trace.run(model, vocab, text, rows=5, stream=False)
    for name in rows.acts:
        torch.testing.assert_close(chunked.acts[name], rows.acts[name], atol=2e-5, rtol=1e-4)


def test_a_cell_with_its_own_internals_is_asked(monkeypatch):
    from charlm.cells import Cell

    text = make_text(300, seed=12)
    vocab = Vocab.from_text(text)
    model = _model("lstm", len(vocab))
    plain = trace.run(model, vocab, text, rows=5)
    calls = []

    def own(self, x, state):
        calls.append(x.shape)
        return Cell.internals(self, x, state)

    monkeypatch.setattr(type(model.rnn), "internals", own)
    asked = trace.run(model, vocab, text, rows=5)
    assert calls and calls[0][:2] == (5, 60)
    for name in plain.acts:
        torch.testing.assert_close(plain.acts[name], asked.acts[name])
