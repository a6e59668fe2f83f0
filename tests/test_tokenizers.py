"""SentencePiece tokenizers: exact round trips, bits per character on one scale, self-contained checkpoints."""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_text, train_small
from typer.testing import CliRunner

from charlm import CharlmError, checkpoint
from charlm.cli import app
from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.evaluate import evaluate, scored_chars
from charlm.decoding.scorer import ModelScorer
from charlm.tokenizers.spm import BYTE_PIECES, TokenizerSpec

SPM_KINDS = ["spm-char", "bpe", "unigram"]
FAST = ["--rnn-size", "32", "--embed-size", "16", "--batch-size", "4", "--seq-length", "16", "--device", "cpu"]
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def corpus_text() -> str:
    """English-like lines, with the things a lossy tokenizer would lose: tabs, runs of spaces, CRLF, emoji, '▁'."""
    extras = [
        "\tindented\twith tabs\n",
        "runs    of     spaces   here\n",
        "windows line\r\n",
        "emoji 😀 and 日本\n",
        "a literal ▁ (U+2581) mid-text\n",
        "  leading and trailing  \n",
    ]
    lines = make_text(24000, seed=1).splitlines(keepends=True)
    for i, extra in enumerate(extras):
        lines.insert(40 * (i + 1), extra)
    return "".join(lines)


@pytest.fixture(scope="module")
def spm_data(tmp_path_factory) -> dict:
    """One prepared dir per SentencePiece tokenizer, all from the same text file."""
    root = tmp_path_factory.mktemp("spm")
    src = root / "corpus.txt"
    src.write_bytes(corpus_text().encode())
    sizes = {"spm-char": None, "bpe": 300, "unigram": 300}
    data = {k: PreparedData(_prepare(src, root / k, TokenizerSpec(k, sizes[k]))) for k in SPM_KINDS}
    return {"src": src, **data}


def _prepare(src: Path, out: Path, spec: TokenizerSpec) -> Path:
    prep.prepare([src], out, tokenizer=spec)
    return out


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Arbitrary Unicode: any plane, control characters, combining marks (no surrogates: not valid UTF-8)."""
    rng = random.Random(seed)
    pools = [(0x20, 0x7F), (0x00, 0x20), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randrange(lo, hi)))
        out.append("".join(chars))
    return out


FIXED_STRINGS = [
    "",
    "a",
    " ",
    "\n",
    "\n\n\n",
    "\t",
    "\t\tindented\ttabs\n",
    "runs    of     spaces   ",
    " leading and trailing ",
    "windows\r\nline\rends\r\n",
    "emoji 😀🎉 👩‍👩‍👧 family",
    "日本語の文章。Ελληνικά Кириллица ☃",
    "never seen: ∮ ⅋ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero width",
    "combining e\u0301 vs é; NFKC would fold ﬁ ＡＢ ①",
    "▁",
    "the SentencePiece space ▁ itself ▁▁ and ▁ x",
    "\x00\x01\x7f controls \x1b[0m",
    "The quick brown fox.\n",
]


@pytest.mark.parametrize("kind", SPM_KINDS)
def test_round_trip_is_the_identity(spm_data, kind):
    vocab = spm_data[kind].vocab
    for s in FIXED_STRINGS + random_strings(60):
        ids = vocab.encode(s)
        assert vocab.decode(ids) == s, (kind, s)
        decode = vocab.stream_decoder()  # piece by piece, byte pieces held back until a character is whole
        assert "".join(decode(int(i)) for i in ids) == s, (kind, s)
        assert 0 not in ids.tolist()  # never <unk>: byte fallback spells what the pieces do not cover
    unseen = vocab.encode("∮")  # not in the training text: its three UTF-8 bytes
    assert [vocab.symbol(i) for i in unseen] == ["<0xE2>", "<0x88>", "<0xAE>"]


@pytest.mark.parametrize("kind", SPM_KINDS)
def test_prepared_splits_spell_the_file_exactly(spm_data, kind):
    data, raw = spm_data[kind], spm_data["src"].read_bytes().decode()
    train_end, val_end = prep.split_bounds(len(raw), (0.9, 0.05, 0.05))
    parts = {"train": raw[:train_end], "val": raw[train_end:val_end], "test": raw[val_end:]}
    for split, text in parts.items():
        assert data.vocab.decode(np.asarray(data.tokens(split))) == text
        assert data.meta["splits"][split]["chars"] == len(text)
    train = data.meta["splits"]["train"]
    # spm-char spells rare characters in several byte pieces; subword pieces span several characters.
    assert train["tokens"] > train["chars"] if kind == "spm-char" else train["tokens"] < train["chars"] / 2
    record = data.meta["tokenizer"]
    assert record["kind"] == kind and record["file"] == "tokenizer.model" and record["sha256"] == data.vocab.sha256
    assert (data.dir / "tokenizer.model").read_bytes() == data.vocab.model_bytes


def test_char_model_bits_per_char_same_per_token_and_per_char(tmp_path, prepared):
    out = tmp_path / "run"
    train_small(prepared, out, max_steps=5)
    ckpt = checkpoint.load(out / "best.safetensors")
    scorer = ModelScorer(ckpt.build_model(), ckpt.vocab)
    tokens = np.asarray(prepared.tokens("val"))
    per_token = evaluate(scorer, tokens)
    per_char = evaluate(scorer, tokens, chars=scored_chars(ckpt.vocab, tokens, prepared.chars("val")))
    assert per_char["bits_per_char"] == per_token["bits_per_char"] == per_char["bits_per_token"]
    assert per_char["chars"] == per_char["tokens"] == len(tokens) - 1
    r = run("eval", out / "best.safetensors", "--split", "val", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["bits_per_char"] == pytest.approx(per_char["bits_per_char"], rel=1e-9)
    assert "bits_per_token" not in payload  # tokens are characters: one figure


def test_bpe_bits_per_char_divides_by_characters_not_tokens(tmp_path, spm_data):
    data = spm_data["bpe"]
    out = tmp_path / "run"
    train_small(data, out, max_steps=10)
    ckpt = checkpoint.load(out / "best.safetensors")
    model = ckpt.build_model()
    tokens = np.asarray(data.tokens("val")).astype(np.int64)
    # The reference, computed apart from evaluate(): NLL of every token after the first, over the
    # characters of the val text (from the file) less those the first token spells.
    ids = torch.from_numpy(tokens).view(1, -1)
    with torch.no_grad():
        logits, _ = model(ids[:, :-1], model.init_state(1))
        nll = float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
    raw = spm_data["src"].read_bytes().decode()
    train_end, val_end = prep.split_bounds(len(raw), (0.9, 0.05, 0.05))
    chars = (val_end - train_end) - len(data.vocab.decode(tokens[:1]))
    assert chars > 2 * (len(tokens) - 1)  # BPE pieces are several characters long: the two divisors differ a lot
    expected = nll / math.log(2) / chars

    r = run("eval", out / "best.safetensors", "--split", "val", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["chars"] == chars and payload["tokens"] == len(tokens) - 1
    assert payload["bits_per_char"] == pytest.approx(expected, rel=1e-4)
    assert payload["bits_per_token"] == pytest.approx(nll / math.log(2) / (len(tokens) - 1), rel=1e-4)
    assert payload["bits_per_token"] > 2 * payload["bits_per_char"]
    table = run("eval", out / "best.safetensors", "--split", "val")
    assert "bits/token" in table.stdout and "bits/char" in table.stdout


def test_spm_checkpoint_needs_neither_corpus_nor_prepared_dir(tmp_path, isolated_corpora):
    src = tmp_path / "text.txt"
    src.write_bytes(corpus_text().encode())
    out = tmp_path / "run"
    r = run("train", src, "--out", out, "--tokenizer", "unigram", "--vocab-size", "200", "--max-steps", "8", *FAST)
    assert r.exit_code == 0, r.output
    ckpt_path = out / "best.safetensors"
    ckpt = checkpoint.load(ckpt_path)
    blob = ckpt.tensors[checkpoint.TOKENIZER_TENSOR]
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    assert ckpt.meta["vocab"]["kind"] == "spm" and ckpt.meta["vocab"]["tokenizer"] == "unigram"
    assert ckpt.meta["vocab"]["sha256"] == ckpt.vocab.sha256 and ckpt.meta["tokenizer"]["kind"] == "unigram"
    assert ckpt.meta["model"]["vocab_size"] == len(ckpt.vocab)

    src.unlink()
    shutil.rmtree(isolated_corpora / ".cache")  # the prepared dir (and its tokenizer.model) is gone too
    prime = "Ωmega 😀 ▁ "  # characters the tokenizer never saw
    r = run("sample", ckpt_path, "--prime", prime, "--length", "30", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(prime)
    r = run("beam", ckpt_path, "--prime", prime, "--length", "5", "--json")
    assert r.exit_code == 0, r.output
    other = tmp_path / "other.txt"
    text = "Brand new text ☃ with 🦄 and ꙮ,\n\tnever seen.\n"
    other.write_text(text)
    r = run("eval", ckpt_path, "--text", other, "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    first = ckpt.vocab.decode(ckpt.vocab.encode(text)[:1])
    assert payload["chars"] == len(text) - len(first) and math.isfinite(payload["bits_per_char"])
    assert run("info", ckpt_path).exit_code == 0
    r = run("eval", ckpt_path, "--split", "val")  # the one command that needs the data says so clearly
    assert r.exit_code == 1 and "prepare" in r.stderr


def mixed_script_text(n_chars: int = 2_700_000, seed: int = 0) -> str:
    """Latin, Greek, Cyrillic, CJK and emoji: a Zipf-distributed head of 200 characters, and a
    tail of 1,200 more, mostly seen once (Zipf-like counts, at least 1). Lines of words."""
    rng = np.random.default_rng(seed)
    head = (
        [
            *range(0x61, 0x7B),
            *range(0x41, 0x5B),
            *range(0x3B1, 0x3CA),
            *range(0x430, 0x450),
            *range(0x4E00, 0x4E32),
            *range(0x1F600, 0x1F614),
            *map(ord, ".,;:!?'-()0123456789"),
        ]
    )[:200]
    tail = [*range(0x5000, 0x5000 + 1000), *range(0x1F300, 0x1F300 + 200)]
    weights = 1.0 / np.arange(1, len(head) + 1)
    text = np.asarray(head, dtype=np.uint32)[rng.choice(len(head), size=n_chars, p=weights / weights.sum())]
    text[5::6] = ord(" ")
    text[71::72] = ord("\n")
    counts = np.maximum(1, (20 / np.arange(1, len(tail) + 1) ** 2).astype(int))
    rare = rng.permutation(np.repeat(np.asarray(tail, dtype=np.uint32), counts))
    letters = np.flatnonzero((text != ord(" ")) & (text != ord("\n")))
    text[rng.choice(letters, size=len(rare), replace=False)] = rare
    return text.astype("<u4").tobytes().decode("utf-32-le")


def test_mixed_script_spm_char_keeps_a_small_vocabulary(tmp_path):
    text = mixed_script_text()
    src = tmp_path / "mixed.txt"
    src.write_text(text)
    meta = prep.prepare([src], tmp_path / "p", tokenizer=TokenizerSpec("spm-char", character_coverage=0.9995))
    data = PreparedData(tmp_path / "p")
    train_text = text[: meta["splits"]["train"]["chars"]]
    assert len(set(text)) > 1000 and len(set(train_text)) > 1000
    pieces = len(data.vocab) - BYTE_PIECES
    assert 150 <= pieces <= 400, pieces  # the head (and space, newline, <unk>), not the 1,200-character tail
    trainer = train_small(data, tmp_path / "run", max_steps=3)
    assert trainer.model_cfg.vocab_size == len(data.vocab)
    ckpt = checkpoint.load(tmp_path / "run" / "best.safetensors")
    scorer = ModelScorer(ckpt.build_model(), ckpt.vocab)
    for s in ["αβγ 日本 абв 😀", "never seen: ☃ 🦄 ꙮ ∮ 𝔘\n", text[-500:]]:
        ids = ckpt.vocab.encode(s)
        assert ckpt.vocab.decode(ids) == s
        result = evaluate(scorer, ids, chars=scored_chars(ckpt.vocab, ids, len(s)))
        assert math.isfinite(result["bits_per_char"]) and result["bits_per_char"] > 0


def test_ensemble_members_must_share_the_tokenizer(tmp_path, spm_data):
    runs = {}
    for name, kind in (("a", "bpe"), ("b", "bpe"), ("u", "unigram")):
        runs[name] = tmp_path / name
        train_small(spm_data[kind], runs[name], max_steps=2, seed=len(runs))
    scorers = {
        k: ModelScorer(checkpoint.load(p / "best.safetensors").build_model(), checkpoint.load(p / "best.safetensors").vocab)
        for k, p in runs.items()
    }
    Ensemble([scorers["a"], scorers["b"]])  # the same prepared data: the same tokenizer
    with pytest.raises(CharlmError, match=r"different vocabularies.*bpe SentencePiece.*unigram SentencePiece.*same tokenizer"):
        Ensemble([scorers["a"], scorers["u"]])
    r = run("sample", runs["a"] / "best.safetensors", runs["u"] / "best.safetensors", "--length", "5")
    assert r.exit_code == 1 and "different vocabularies" in r.stderr and "Traceback" not in r.output
    r = run("eval", runs["a"] / "best.safetensors", runs["b"] / "best.safetensors", "--split", "val", "--json")
    assert r.exit_code == 0, r.output
    assert "bits_per_token" in json.loads(r.stdout)


def test_char_prime_with_unknown_characters(tmp_path, trained):
    ckpt = trained / "best.safetensors"
    for command in ("sample", "beam"):
        r = run(command, ckpt, "--prime", "Zebra ☃ é", "--length", "5")
        assert r.exit_code == 1 and "'☃'" in r.stderr and "'é'" in r.stderr and "--unknown skip" in r.stderr
        r = run(command, ckpt, "--prime", "The ☃", "--length", "5", "--unknown", "skip")
        assert r.exit_code == 0, r.output
        assert "The ☃" in r.stdout  # the prime is printed as given; the model saw "The "


def test_tokenizer_options_and_cache_key(tmp_path, text_file):
    assert prep.options_key("utf-8", (0.9, 0.05, 0.05)) == prep.options_key("utf-8", (0.9, 0.05, 0.05), TokenizerSpec())
    bpe = TokenizerSpec("bpe", 100)
    char_dir = prep.cached_prepare(text_file)
    bpe_dir = prep.cached_prepare(text_file, tokenizer=bpe)
    assert bpe_dir != char_dir and prep.cached_prepare(text_file, tokenizer=TokenizerSpec("bpe", 200)) != bpe_dir
    assert PreparedData(bpe_dir).vocab.kind == "spm" and PreparedData(char_dir).vocab.kind == "char"
    assert prep.cached_prepare(bpe_dir, tokenizer=bpe) == bpe_dir
    with pytest.raises(CharlmError, match="already prepared with the char tokenizer"):
        prep.cached_prepare(char_dir, tokenizer=bpe)
    with pytest.raises(CharlmError, match="--vocab-size and --character-coverage apply to SentencePiece"):
        TokenizerSpec("char", 100).checked()
    with pytest.raises(CharlmError, match="--tokenizer must be one of"):
        prep.prepare([text_file], tmp_path / "x", tokenizer=TokenizerSpec("wordpiece"))
    many = tmp_path / "many.txt"
    many.write_text("".join(chr(0x4E00 + i) for i in range(400)) * 3 + "\n")
    with pytest.raises(CharlmError, match="--vocab-size 50 is too small.*need \\d+ pieces"):
        prep.prepare([many], tmp_path / "y", tokenizer=TokenizerSpec("bpe", 50, 1.0))
    r = run("prepare", text_file, "-o", tmp_path / "z", "--tokenizer", "bpe", "--encoding", "bytes")
    assert r.exit_code == 1 and "UTF-8" in r.stderr
