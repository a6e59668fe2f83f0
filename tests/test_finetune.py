"""Fine-tuning on new text: vocabularies that grow (old ids kept, new symbols appended)."""

from __future__ import annotations

import numpy as np

from charlm.tokenizers.vocab import Vocab


def test_extended_vocabulary_keeps_old_ids_and_appends_new_symbols():
    old = Vocab.from_text("the cat\n")
    grown = old.extended(ord(c) for c in "the {cat} Æ\n")
    assert grown.decode(range(len(old))) == old.decode(range(len(old)))  # every old id names the same symbol
    assert grown.decode(range(len(old), len(grown))) == "{}Æ"  # the new ones follow, in code-point order
    text = "the {cat} Æ\n"
    assert grown.decode(grown.encode(text)) == text
    assert np.array_equal(grown.encode("the cat\n"), old.encode("the cat\n"))
    again = Vocab.from_meta(grown.to_meta())
    assert again == grown and np.array_equal(again.encode(text), grown.encode(text))
    assert list(grown.lookup([ord("{"), ord("t"), ord("Z")])) == [len(old), int(old.encode("t")[0]), -1]
    assert old.extended(ord(c) for c in "cat") is old


import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import FAST, make_text, run, small_configs, train_small  # noqa: E402

from charlm import checkpoint  # noqa: E402
from charlm.cells import cell_names  # noqa: E402
from charlm.data import PreparedData  # noqa: E402
from charlm.data import prepare as prep  # noqa: E402
from charlm.decoding.evaluate import evaluate  # noqa: E402
from charlm.decoding.scorer import ModelScorer  # noqa: E402
from charlm.training.trainer import Trainer  # noqa: E402

NEW = "{}Æ"


def texts(tmp_path):
    old = tmp_path / "old.txt"
    old.write_text(make_text(12000, seed=1))
    new = tmp_path / "new.txt"
    new.write_text("".join(f"{line} {NEW[i % 3]}\n" for i, line in enumerate(make_text(12000, seed=2).splitlines())))
    return old, new


@pytest.mark.parametrize("cell", cell_names())
def test_grown_model_scores_the_old_text_as_before_and_new_characters_finitely(tmp_path, cell):
    old_text, new_text = texts(tmp_path)
    prep.prepare([old_text], tmp_path / "p-old")
    old_data = PreparedData(tmp_path / "p-old")
    train_small(old_data, tmp_path / "a", cell=cell, max_steps=15)
    base = checkpoint.load(tmp_path / "a" / "last.safetensors")
    prep.prepare([new_text], tmp_path / "p-new", base_vocab=base.vocab)
    new_data = PreparedData(tmp_path / "p-new")
    assert new_data.vocab.decode(range(len(base.vocab))) == base.vocab.decode(range(len(base.vocab)))  # old ids kept
    model_cfg, train_cfg = small_configs(cell, max_steps=1)
    grown = Trainer(model_cfg, train_cfg, new_data, tmp_path / "b", init_from=base).model.eval()
    tokens = old_data.tokens("val")
    before = evaluate(ModelScorer(base.build_model(), base.vocab), tokens)["bits_per_char"]
    after = evaluate(ModelScorer(grown, new_data.vocab), tokens)["bits_per_char"]
    assert abs(after - before) <= 0.001, (before, after)
    with_new = new_data.vocab.encode("the quick {fox} Æ\n")
    assert torch.isfinite(torch.tensor(evaluate(ModelScorer(grown, new_data.vocab), with_new)["bits_per_char"]))


def test_init_from_with_new_characters_trains_resumes_and_samples_them(tmp_path):
    old_text, new_text = texts(tmp_path)
    r = run("train", old_text, "--out", tmp_path / "a", "--max-steps", "20", *FAST)
    assert r.exit_code == 0, r.output
    tune = [
        "train",
        new_text,
        "--init-from",
        tmp_path / "a" / "last.safetensors",
        "--out",
        tmp_path / "b",
        "--resume",
        "auto",
        "--lr",
        "0.01",
        "--eval-every",
        "20",
        *FAST,
    ]
    r = run(*tune, "--max-steps", "40")
    assert r.exit_code == 0, r.output
    r = run(*tune, "--max-steps", "60")  # the same command again: it continues the fine-tuning run
    assert r.exit_code == 0, r.output
    meta = checkpoint.read_meta(tmp_path / "b" / "last.safetensors")
    assert meta["train_state"]["step"] == 60 and meta["train"]["warmup_steps"] == 100
    lineage = meta["provenance"]["fine_tuned_from"]
    assert lineage[0]["checkpoint"].endswith("last.safetensors") and lineage[0]["on"].endswith("new.txt")
    r = run(
        "sample",
        tmp_path / "b" / "last.safetensors",
        "--prime",
        "Æ",
        "--length",
        3000,
        "--temperature",
        1.5,
        "--seed",
        3,
        "--device",
        "cpu",
    )
    assert r.exit_code == 0 and any(c in r.stdout[1:] for c in NEW), r.output
    info = run("info", tmp_path / "b" / "last.safetensors")
    assert "fine-tuned from" in info.stdout


def test_vocab_from_prepare_and_errors_name_the_checkpoint_and_the_text(tmp_path):
    old_text, new_text = texts(tmp_path)
    assert run("train", old_text, "--out", tmp_path / "a", "--max-steps", "3", *FAST).exit_code == 0
    ckpt = tmp_path / "a" / "last.safetensors"
    r = run("prepare", new_text, "-o", tmp_path / "p", "--vocab-from", ckpt)
    assert r.exit_code == 0, r.output
    vocab = json.loads((tmp_path / "p" / "meta.json").read_text())["vocab"]["chars"]
    assert vocab.endswith("{}Æ")
    # A prepared dir made with its own vocabulary cannot be fine-tuned: the message names both, no cache path.
    other = tmp_path / "other.txt"
    other.write_text(new_text.read_text() + "# a character that sorts before the old ones\n")
    assert run("prepare", other, "-o", tmp_path / "own").exit_code == 0
    r = run("train", tmp_path / "own", "--init-from", ckpt, "--out", tmp_path / "c", "--max-steps", "2", *FAST)
    assert r.exit_code == 1 and "--vocab-from" in r.stderr and str(ckpt) in r.stderr and ".cache" not in r.stderr, r.stderr


def test_freeze_layers_holds_the_lower_layers_for_the_first_steps(tmp_path):
    old_text, new_text = texts(tmp_path)
    prep.prepare([old_text], tmp_path / "p-old")
    train_small(PreparedData(tmp_path / "p-old"), tmp_path / "a", max_steps=5)
    base = checkpoint.load(tmp_path / "a" / "last.safetensors")
    prep.prepare([new_text], tmp_path / "p-new", base_vocab=base.vocab)
    model_cfg, train_cfg = small_configs("lstm", max_steps=4, freeze_layers=1, freeze_steps=3)
    trainer = Trainer(model_cfg, train_cfg, PreparedData(tmp_path / "p-new"), tmp_path / "b", init_from=base)
    frozen = {id(p) for p in trainer.frozen}
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    loss = torch.zeros(())
    for _ in range(3):
        trainer.step(loss)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, start[name]) == (id(p) in frozen), name
    trainer.step(loss)  # past freeze_steps: they learn too
    assert not torch.equal(trainer.model.embed.weight, start["embed.weight"])
