import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from charlm import CharlmError
from charlm.data import PreparedData, encode
from charlm.data import prepare as prep
from charlm.tokenizers.vocab import Vocab


def decode_all(data: PreparedData) -> str:
    return "".join(data.vocab.decode(np.asarray(data.tokens(s))) for s in ("train", "val", "test"))


def test_splits_are_contiguous_and_round_trip(tmp_path, text_file):
    meta = prep.prepare([text_file], tmp_path / "p")
    data = PreparedData(tmp_path / "p")
    text = text_file.read_text()
    assert decode_all(data) == text
    n = len(text)
    assert meta["splits"]["train"]["tokens"] == int(n * 0.9)
    assert sum(s["tokens"] for s in meta["splits"].values()) == n
    assert meta["dtype"] == "uint8"
    assert meta["source"]["chars"] == n
    assert meta["source"]["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["vocab_size"] == len(set(text))


def test_split_is_configurable(tmp_path, text_file):
    meta = prep.prepare([text_file], tmp_path / "p", fractions=(0.8, 0.1, 0.1))
    n = len(text_file.read_text())
    assert meta["splits"]["train"]["tokens"] == int(n * 0.8)
    with pytest.raises(CharlmError, match="fractions"):
        prep.prepare([text_file], tmp_path / "q", fractions=(0.8, 0.3, 0.1))


@pytest.mark.parametrize("chunk", [7, 8, 9, 4096])
def test_chunked_encoding_handles_multibyte_boundaries(tmp_path, monkeypatch, chunk):
    # 1-, 2-, 3- and 4-byte characters, and all-ASCII stretches longer than a chunk
    text = ("héllo wörld — ünïcödé ✓ 日本語 😀🎉\n" + "plain ascii line\n" * 3) * 50
    f = tmp_path / "u.txt"
    f.write_text(text)
    monkeypatch.setattr(encode, "CHUNK", chunk)  # small chunks split multi-byte characters across reads
    prep.prepare([f], tmp_path / "p")
    data = PreparedData(tmp_path / "p")
    assert decode_all(data) == text
    assert data.meta["source"]["chars"] == len(text)


def test_large_vocab_uses_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    f = tmp_path / "cjk.txt"
    f.write_text(text)
    meta = prep.prepare([f], tmp_path / "p")
    assert meta["dtype"] == "uint16"
    assert decode_all(PreparedData(tmp_path / "p")) == text


def test_directory_input_in_sorted_order(tmp_path):
    d = tmp_path / "src"
    (d / "b").mkdir(parents=True)
    (d / "b" / "z.c").write_text("int z;\n")
    (d / "a.c").write_text("int a;\n")
    (d / "notes.md").write_text("skip me\n")
    files = prep.resolve_inputs(d, glob="**/*.c")
    assert [f.name for f in files] == ["a.c", "z.c"]
    prep.prepare(files, tmp_path / "p", fractions=(1.0, 0.0, 0.0))
    assert decode_all(PreparedData(tmp_path / "p")) == "int a;\nint z;\n"


def test_bytes_encoding_for_non_utf8(tmp_path):
    raw = "café naïve\n".encode("latin-1") * 20
    f = tmp_path / "latin1.txt"
    f.write_bytes(raw)
    with pytest.raises(CharlmError, match="not valid UTF-8.*--encoding bytes"):
        prep.prepare([f], tmp_path / "p")
    meta = prep.prepare([f], tmp_path / "p", encoding="bytes")
    data = PreparedData(tmp_path / "p")
    assert meta["vocab"]["kind"] == "bytes"
    ids = np.concatenate([np.asarray(data.tokens(s)) for s in ("train", "val", "test")])
    assert bytes(data.vocab.codes[ids].astype(np.uint8).tolist()) == raw


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"hello\x00\x01\x02binary", "binary"),
        (b"valid start \xff\xfe broken", "not valid UTF-8"),
    ],
)
def test_bad_inputs_are_clear_errors(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(CharlmError, match=message):
        prep.prepare([f], tmp_path / "p")
    assert not (tmp_path / "p" / "meta.json").exists()


def test_vocab_names_unknown_characters():
    v = Vocab.from_text("abc")
    with pytest.raises(CharlmError, match="'z'"):
        v.encode("abz")
    assert v.encode("abz", unknown="skip").tolist() == [0, 1]
    assert Vocab.from_meta(v.to_meta()) == v


def test_cached_prepare_reuses_the_cache(tmp_path, text_file):
    first = prep.cached_prepare(text_file)
    stamp = (first / "train.bin").stat().st_mtime_ns
    assert prep.cached_prepare(text_file) == first
    assert (first / "train.bin").stat().st_mtime_ns == stamp
    assert prep.cached_prepare(first) == first  # a prepared dir is used as given


def test_input_changed_between_passes_is_an_error_and_leaves_no_parts(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n" * 100)
    original = prep.char_ids

    def changed(files, encoding, vocab, sha256):  # as if the file changed after pass 1 hashed it
        yield from original(files, encoding, vocab, "0" * 64)

    monkeypatch.setattr(prep, "char_ids", changed)
    with pytest.raises(CharlmError, match="changed while it was being prepared"):
        prep.prepare([f], tmp_path / "p")
    assert not list((tmp_path / "p").glob("*.part")) and not (tmp_path / "p" / "meta.json").exists()


def test_a_failed_prepare_leaves_the_old_dir_intact(tmp_path, text_file):
    out = tmp_path / "p"
    prep.prepare([text_file], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"text\x00more")
    with pytest.raises(CharlmError, match="binary"):
        prep.prepare([binary], out)
    with pytest.raises(CharlmError, match="--split"):
        prep.prepare([text_file], out, fractions=(float("nan"), 0.5, 0.5))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work dir left beside it


def test_prepare_replaces_a_prepared_dir_whole_and_refuses_other_dirs(tmp_path, text_file):
    out = tmp_path / "p"
    prep.prepare([text_file], out, tokenizer=None)
    (out / "tokenizer.model").write_bytes(b"from an older SentencePiece run")
    prep.prepare([text_file], out)
    assert not (out / "tokenizer.model").exists()  # nothing of the old run is left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CharlmError, match="holds other files.*notes.txt"):
        prep.prepare([text_file], mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_an_abandoned_work_dir_is_cleaned_up(tmp_path, text_file):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".p.building-{dead}-abcd1234"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 100)
    prep.prepare([text_file], tmp_path / "p")
    assert not stale.exists()
