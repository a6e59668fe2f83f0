"""Ensembles of models with different character vocabularies: the members speak the union (charlm/decoding/union.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_text, run, train_small

import charlm
from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.decoding.union import union_vocab


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Model A knows '{' and '}', model B knows 'Æ' and 'Ø'; both know the common text's characters."""
    d = tmp_path_factory.mktemp("union")
    for name, extra, cell in (("a", "{}", "lstm"), ("b", "ÆØ", "gru")):
        text = "".join(line + extra[i % 2] + "\n" for i, line in enumerate(make_text(12000, seed=ord(name)).splitlines()))
        (d / f"{name}.txt").write_text(text)
        prep.prepare([d / f"{name}.txt"], d / f"prep-{name}")
        train_small(PreparedData(d / f"prep-{name}"), d / name, cell=cell, max_steps=15)
    return d / "a" / "best.safetensors", d / "b" / "best.safetensors"


def member_logprob(lm, text: str) -> list[float]:
    """By hand: a member's log-prob of each symbol after the first, reading only the symbols it knows
    (before it has read one: uniform); -inf for a symbol it lacks."""
    scorer, vocab = lm.members[0], lm.vocab
    out, state, logp = [], scorer.start(1), torch.full((len(vocab),), -math.log(len(vocab)))
    for prev, nxt in zip(text, text[1:]):
        if prev in vocab.decode(range(len(vocab))):
            step, state = scorer.step(torch.tensor(vocab.encode(prev)), state)
            logp = step[0]
        known = nxt in vocab.decode(range(len(vocab)))
        out.append(float(logp[int(vocab.encode(nxt)[0])]) if known else -math.inf)
    return out


def test_union_ensemble_equals_the_hand_computed_mixture(pair):
    a, b = (charlm.load(p, device="cpu", dtype="fp32") for p in pair)
    ens = charlm.load(*pair, device="cpu", dtype="fp32")
    assert set(ens.vocab.decode(range(len(ens.vocab)))) == set(a.vocab.decode(range(len(a.vocab)))) | set("ÆØ")
    text = "the {fox} Æ lazy Ø dog.\n"
    pa, pb = member_logprob(a, text), member_logprob(b, text)
    want = sum(-math.log(0.5 * math.exp(x) + 0.5 * math.exp(y)) for x, y in zip(pa, pb)) / math.log(2) / (len(text) - 1)
    got = ens.score(text)
    assert math.isfinite(got.bits_per_char) and abs(got.bits_per_char - want) < 1e-5
    # Each member's own figure leaves out the symbols it never saw.
    assert [m.chars for m in got.members] == [len(text) - 3, len(text) - 3]


def test_union_ensemble_samples_beams_and_evals_from_the_cli(pair, tmp_path):
    text = tmp_path / "mixed.txt"
    text.write_text("the {quick} fox Æ jumps Ø over.\n" * 3)
    result = run("eval", *pair, "--text", text, "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = run("sample", *pair, "--prime", "the {Æ", "--length", 50, "--seed", 1, "--device", "cpu")
    assert result.exit_code == 0 and result.stdout.startswith("the {Æ"), result.output
    result = run("beam", *pair, "--prime", "Ø the", "--length", 10, "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_union_refusals(pair):
    with pytest.raises(charlm.OptionError, match="geometric"):
        charlm.load(*pair, device="cpu", dtype="fp32", combine="geometric")
    ens = charlm.load(*pair, device="cpu", dtype="fp32")
    with pytest.raises(charlm.OptionError, match="share one vocabulary"):
        ens.score("the fox", dynamic=True)


def test_union_of_different_kinds_is_refused():
    from charlm.tokenizers.vocab import Vocab

    with pytest.raises(charlm.CharlmError, match="different kinds"):
        union_vocab([Vocab("char", [65, 66]), Vocab("bytes", [65, 67])])
