"""Bad inputs, one table: every case ends in exit code 1 and one line on stderr, and harms nothing.

Each case builds its inputs in its own dir, hashes every file there and in the module's shared run
(text, prepared dir, a tiny trained run), runs one command, and checks the contract:

- exit code 1, and exactly one non-empty line on stderr, starting "error: " and saying the
  case's essential word (a loose regex: the wording is the library's to choose);
- no traceback, and no exception other than the CLI's own exit (CliRunner would swallow one);
- a warning printed before the error counts as a line of its own (a real process would show it);
- nothing on stdout, except for `sample`, which streams its text;
- every file and dir that was there before is byte-identical after, and nothing new appears
  except where the case allows it.

Hostile checkpoints are written here byte by byte (8-byte little-endian header length, JSON
header, data), with valid checksums unless the case is about them, so each file is wrong in one
way only.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import make_text
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from typer.testing import CliRunner

from charlm import cli
from charlm.cli import app
from charlm.devices import cpu_has_bf16

runner = CliRunner()
FAST = ["--rnn-size", "32", "--embed-size", "16", "--batch-size", "4", "--seq-length", "16", "--device", "cpu"]
MAX_COUNT = (1 << 63) - 1


# -- the shared run: one tiny trained model for the whole module --------------------------------


@dataclass
class Shared:
    root: Path
    text: Path  # the training text
    prepared: Path  # its prepared dir (the checkpoints' provenance.data_dir)
    run: Path  # a run dir: best.safetensors, last.safetensors, metrics.jsonl

    @property
    def best(self) -> Path:
        return self.run / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.run / "last.safetensors"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as mp:  # the autouse corpora fixture is per test: this runs before it
        (root / "corpora").mkdir()
        mp.setenv("CHARLM_CORPORA_DIR", str(root / "corpora"))
        text = root / "tiny.txt"
        text.write_text(make_text())
        prepared = root / "prepared"
        r = runner.invoke(app, ["prepare", str(text), "-o", str(prepared)])
        assert r.exit_code == 0, r.output
        run = root / "run"
        r = runner.invoke(
            app, ["train", str(prepared), "--out", str(run), "--max-steps", "4", "--eval-every", "2", "--log-every", "1", *FAST]
        )
        assert r.exit_code == 0, r.output
    return Shared(root, text, prepared, run)


# -- building bad files -----------------------------------------------------------------------


def st_bytes(header, data: bytes = b"") -> bytes:
    """A safetensors file from a header (an object, written as JSON, or raw bytes) and a data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _digest(tensors, prefix: bytes = b"") -> str:
    h = hashlib.sha256(prefix)
    for t in tensors:
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_parts(src: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint written by charlm itself (trusted here): its tensors and its `meta` record."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    md = json.loads(raw[8 : 8 + n])["__metadata__"]
    return dict(load_file(str(src))), json.loads(md["meta"])


def write_ckpt(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict | str, checksums: bool = True, version: str = "1"
) -> Path:
    """A charlm checkpoint with exactly these tensors and this meta (a dict, or the JSON text as is)."""
    text = meta if isinstance(meta, str) else json.dumps(meta, ensure_ascii=False)
    md = {"format": "charlm-checkpoint", "format_version": version, "meta": text}
    if checksums:  # the same scheme as checkpoint.save: model.* data; then the meta text and the other tensors
        names = sorted(tensors)
        md["weights_sha256"] = _digest(tensors[k] for k in names if k.startswith("model."))
        md["record_sha256"] = _digest(
            (tensors[k] for k in names if not k.startswith("model.")), prefix=text.encode("utf-8", "surrogatepass")
        )
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path.write_bytes(st_save(tensors, metadata=md))
    return path


def forge(
    c: "Ctx",
    name: str,
    meta_fn: Callable[[dict], None] | None = None,
    tensor_fn: Callable[[dict], None] | None = None,
    src: Path | None = None,
    **kw,
) -> Path:
    """A copy of the shared last.safetensors (or src) with its meta and/or tensors changed in place by the functions."""
    tensors, meta = read_parts(src or c.shared.last)
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta = copy.deepcopy(meta)
    if meta_fn:
        meta_fn(meta)
    if tensor_fn:
        tensor_fn(tensors)
    return write_ckpt(c.d / name, tensors, meta, **kw)


# -- one case ---------------------------------------------------------------------------------


@dataclass
class Ctx:
    d: Path  # the case's own dir
    shared: Shared


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list]  # writes the case's inputs under c.d; returns the command's arguments
    pattern: str  # what the one error line must say (re.search, case-insensitive)
    stream: bool = False  # a command that streams text to stdout (sample)
    new: tuple[str, ...] = ()  # globs (relative to the test's tmp_path) of paths allowed to appear
    via: str = "runner"  # runner: CliRunner on charlm.cli.app; main: charlm.cli.main in-process; process: python -m charlm
    skip: Callable[[], str | None] | None = None  # a reason to skip, on this machine
    env: dict | None = None  # process only: environment variables for the command (a locale, say)


CASES: list[Case] = []


def add(id: str, pattern: str, build: Callable[[Ctx], list], **kw) -> None:
    CASES.append(Case(id, build, pattern, **kw))


def write(c: Ctx, name: str, content: bytes | str) -> Path:
    p = c.d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def copy_run(c: Ctx) -> Path:
    out = c.d / "run"
    shutil.copytree(c.shared.run, out)
    return out


def no_bf16() -> str | None:
    return "this CPU runs bf16: nothing to refuse" if cpu_has_bf16() else None


# -- bad checkpoint files, each through sample, eval, beam, info and train --resume ------------


def _md() -> dict:
    return {"format": "charlm-checkpoint", "format_version": "1", "meta": "{}"}


def _zip(c: Ctx) -> Path:
    p = c.d / "zipped.safetensors"
    torch.save({"weight": torch.zeros(3)}, p)  # torch.save writes a zip archive
    assert zipfile.is_zipfile(p)
    return p


def _num_layers(value) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        return forge(c, "layers.safetensors", lambda m: m["model"].update(num_layers=value))

    return build


def _nan_weight(c: Ctx) -> Path:
    def poison(t):
        t["model.head.bias"][0] = float("nan")

    return forge(c, "nan.safetensors", tensor_fn=poison)


def _vocab_short(c: Ctx) -> Path:
    return forge(c, "short-vocab.safetensors", lambda m: m["vocab"].update(chars=m["vocab"]["chars"][:-1]))


def _char_with_tokenizer(c: Ctx) -> Path:
    def add_tokenizer(t):  # a BPE model's bytes (any bytes will do) beside a char vocabulary
        t["tokenizer.spm"] = torch.frombuffer(bytearray(b"\x0a\x0bSentencePiece BPE model bytes" * 8), dtype=torch.uint8)

    return forge(c, "char-bpe.safetensors", tensor_fn=add_tokenizer)


def _vocab_size_zero(c: Ctx) -> Path:
    """A consistent model of 0 symbols: vocab_size 0, no characters, zero-row embedding and head (and moments)."""
    tensors, meta = read_parts(c.shared.last)
    v = meta["model"]["vocab_size"]
    meta["model"]["vocab_size"] = 0
    meta["vocab"]["chars"] = ""
    out = {}
    for k, t in tensors.items():
        if t.dim() >= 1 and t.shape[0] == v and (k.startswith("model.") or ".exp_avg" in k):
            t = torch.zeros((0, *t.shape[1:]), dtype=t.dtype)
        out[k] = t
    return write_ckpt(c.d / "vocab0.safetensors", out, meta)


def _deep(c: Ctx) -> Path:
    depth = 200_000
    return write(
        c,
        "deep.safetensors",
        st_bytes(b'{"__metadata__": {"format": "charlm-checkpoint"}, "x": ' + b"[" * depth + b"]" * depth + b"}"),
    )


def _huge_number(c: Ctx) -> Path:
    header = (
        '{"__metadata__": {"format": "charlm-checkpoint", "format_version": "1", "meta": "{}"}, '
        '"model.head.bias": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}'
    )
    return write(c, "huge-number.safetensors", st_bytes(header.encode(), b"\0" * 4))


CHECKPOINT_KINDS: list[tuple[str, Callable[[Ctx], Path], str]] = [
    ("missing", lambda c: c.d / "nosuch.safetensors", r"does not exist|no such|not found"),
    ("directory", lambda c: (c.d / "adir").mkdir() or c.d / "adir", r"directory"),
    ("empty", lambda c: write(c, "empty.safetensors", b""), r"empty|truncated"),
    (
        "truncated",
        lambda c: write(c, "cut.safetensors", c.shared.last.read_bytes()[:1000]),
        r"truncated|corrupt|not a safetensors",
    ),
    ("zip", _zip, r"zip"),
    ("pickle", lambda c: write(c, "pickled.safetensors", pickle.dumps({"weight": [0.0] * 4}, protocol=4)), r"pickle"),
    (
        "random-bytes",
        lambda c: write(c, "random.safetensors", random.Random(0).randbytes(4096)),
        r"not a safetensors|corrupt|truncated",
    ),
    (
        "foreign-safetensors",
        lambda c: save_file({"weight": torch.zeros(3)}, str(c.d / "foreign.safetensors")) or c.d / "foreign.safetensors",
        r"not a charlm",
    ),
    (
        "foreign-json",
        lambda c: write(c, "config.safetensors", json.dumps({"architectures": ["GPT2"], "n_layer": 12})),
        r"not a safetensors|corrupt|not a charlm|truncated",
    ),
    ("header-list", lambda c: write(c, "list.safetensors", st_bytes(b"[1, 2, 3]")), r"corrupt|header|not a safetensors"),
    (
        "header-string",
        lambda c: write(c, "string.safetensors", st_bytes(b'"charlm-checkpoint"')),
        r"corrupt|header|not a safetensors",
    ),
    (
        "metadata-not-dict",
        lambda c: write(c, "md-list.safetensors", st_bytes({"__metadata__": ["format", "charlm-checkpoint"]})),
        r"__metadata__|metadata|corrupt",
    ),
    (
        "data-offsets-len0",
        lambda c: write(
            c,
            "offsets0.safetensors",
            st_bytes({"__metadata__": _md(), "model.head.bias": {"dtype": "F32", "shape": [2], "data_offsets": []}}, b"\0" * 8),
        ),
        r"data_offsets|corrupt",
    ),
    (
        "data-offsets-len1",
        lambda c: write(
            c,
            "offsets1.safetensors",
            st_bytes({"__metadata__": _md(), "model.head.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8),
        ),
        r"data_offsets|corrupt",
    ),
    ("deep-nesting", _deep, r"nest|corrupt|not a safetensors"),
    ("5000-digit-number", _huge_number, r"corrupt|not a safetensors|digit|number|shape"),
    ("nan-weight", _nan_weight, r"nan|finite"),
    ("vocab-shorter-than-output", _vocab_short, r"vocab"),
    ("char-model-with-tokenizer", _char_with_tokenizer, r"tokenizer|sentencepiece"),
    ("num-layers-1e12", _num_layers(1e12), r"num_layers|layers"),
    ("vocab-size-0", _vocab_size_zero, r"vocab"),
]

CHECKPOINT_COMMANDS: list[tuple[str, Callable[[Path], list], bool]] = [
    ("sample", lambda p: ["sample", p, "--length", "5", "--seed", "1"], True),
    ("eval", lambda p: ["eval", p], False),
    ("beam", lambda p: ["beam", p, "--length", "5"], False),
    ("info", lambda p: ["info", p], False),
    ("resume", lambda p: ["train", "--resume", p, "--max-steps", "8"], False),
]

for _kind, _make, _pattern in CHECKPOINT_KINDS:
    for _cmd, _argv, _stream in CHECKPOINT_COMMANDS:
        add(f"{_cmd}-{_kind}", _pattern, lambda c, m=_make, a=_argv: a(m(c)), stream=_stream)

# The hang of the past (num_layers 1e12: memory grows without end) in a real process, with a timeout.
add(
    "process-sample-num-layers-1e12",
    r"num_layers|layers",
    lambda c: ["sample", _num_layers(1e12)(c), "--length", "5"],
    via="process",
    stream=True,
)
add(
    "process-beam-num-layers-1e12-int",
    r"num_layers|layers",
    lambda c: ["beam", _num_layers(10**12)(c), "--length", "5"],
    via="process",
)


def _flip_weight_byte(c: Ctx) -> Path:
    p = forge(c, "flipped.safetensors")
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n] ^= 0x01  # the lowest mantissa bit of the first stored float: a finite, plausible weight
    p.write_bytes(bytes(raw))
    return p


def _set_tensor(name: str, value: torch.Tensor):
    def fn(t):
        t[name] = value

    return fn


def _drop_tensor(name: str):
    def fn(t):
        del t[name]

    return fn


# More ways a checkpoint can be wrong, each through one command.
add("eval-json-nan-weight", r"nan|finite", lambda c: ["eval", _nan_weight(c), "--json"])  # never "bits_per_char": NaN
add("sample-greedy-nan-weight", r"nan|finite", lambda c: ["sample", _nan_weight(c), "--greedy", "--length", "20"], stream=True)
add(
    "sample-checksum-mismatch",
    r"checksum|sha256|corrupt",
    lambda c: ["sample", _flip_weight_byte(c), "--length", "5"],
    stream=True,
)
add("info-format-version-99", r"version|upgrade", lambda c: ["info", forge(c, "v99.safetensors", version="99")])
add(
    "eval-weight-wrong-dtype",
    r"F32|F16|dtype",
    lambda c: [
        "eval",
        forge(c, "f16.safetensors", tensor_fn=lambda t: t.update({"model.head.bias": t["model.head.bias"].half()})),
    ],
)
add(
    "beam-extra-tensor",
    r"tensor|not part",
    lambda c: [
        "beam",
        forge(c, "extra.safetensors", tensor_fn=_set_tensor("model.rnn.weight_ih_l7", torch.zeros(4))),
        "--length",
        "5",
    ],
)
add(
    "sample-missing-tensor",
    r"lacks|missing|tensor",
    lambda c: [
        "sample",
        forge(c, "missing-tensor.safetensors", tensor_fn=_drop_tensor("model.rnn.weight_hh_l1")),
        "--length",
        "5",
    ],
    stream=True,
)
add(
    "info-unknown-cell",
    r"cell",
    lambda c: ["info", forge(c, "cell.safetensors", lambda m: m["model"].update(cell="transformer"))],
)
add(
    "sample-negative-rnn-size",
    r"rnn_size",
    lambda c: ["sample", forge(c, "neg.safetensors", lambda m: m["model"].update(rnn_size=-32)), "--length", "5"],
    stream=True,
)
add(
    "eval-inf-weight",
    r"nan|finite|infinite",
    lambda c: [
        "eval",
        forge(c, "inf.safetensors", tensor_fn=lambda t: t["model.embed.weight"].__setitem__((0, 0), float("inf"))),
    ],
)
add(
    "sample-meta-not-json",
    r"corrupt|metadata|json",
    lambda c: [
        "sample",
        write_ckpt(c.d / "badmeta.safetensors", read_parts(c.shared.best)[0], '{"model": {"cell": "lstm", '),
        "--length",
        "5",
    ],
    stream=True,
)
add(
    "info-meta-5000-digit-number",
    r"corrupt|metadata|digit|number|num_layers",
    lambda c: [
        "info",
        write_ckpt(
            c.d / "bignum.safetensors",
            read_parts(c.shared.best)[0],
            json.dumps(read_parts(c.shared.best)[1]).replace('"num_layers": 2', '"num_layers": ' + "7" * 5000),
        ),
    ],
)
add(
    "info-header-length-past-end",
    r"not a safetensors|truncated|corrupt",
    lambda c: ["info", write(c, "long-header.safetensors", struct.pack("<Q", 1 << 40) + b'{"a": 1}')],
)
add(
    "sample-meta-a-list",
    r"corrupt|metadata|object|mapping",
    lambda c: ["sample", write_ckpt(c.d / "meta-list.safetensors", read_parts(c.shared.best)[0], "[1, 2, 3]"), "--length", "5"],
    stream=True,
)
add(
    "info-vocab-duplicate",
    r"vocab.*distinct",
    lambda c: [
        "info",
        forge(  # any order of distinct symbols is valid (a grown vocabulary)
            c, "duplicate.safetensors", lambda m: m["vocab"].update(chars=m["vocab"]["chars"][:-1] + m["vocab"]["chars"][0])
        ),
    ],
)

# Training states that cannot be resumed (the weights are fine; the state is not).
_TS = "train_state"
add(
    "resume-state-unknown-key",
    r"unknown|bogus",
    lambda c: ["train", "--resume", forge(c, "last.safetensors", lambda m: m[_TS].update(bogus=1)), "--max-steps", "8"],
)
add(
    "resume-state-step-not-integer",
    r"step",
    lambda c: ["train", "--resume", forge(c, "last.safetensors", lambda m: m[_TS].update(step=2.5)), "--max-steps", "8"],
)
add(
    "resume-state-step-a-string",
    r"step",
    lambda c: ["train", "--resume", forge(c, "last.safetensors", lambda m: m[_TS].update(step="2")), "--max-steps", "8"],
)
add(
    "resume-state-best-val-null",
    r"best_val",
    lambda c: ["train", "--resume", forge(c, "last.safetensors", lambda m: m[_TS].update(best_val=None)), "--max-steps", "8"],
)
add(
    "resume-state-rng-wrong-size",
    r"random|rng|generator",
    lambda c: [
        "train",
        "--resume",
        forge(
            c,
            "last.safetensors",
            tensor_fn=lambda t: t.update({"train_state.rng.torch": t["train_state.rng.torch"][:100].clone()}),
        ),
        "--max-steps",
        "8",
    ],
)
add(
    "resume-state-moment-wrong-shape",
    r"optim|moment|exp_avg|parameter",
    lambda c: [
        "train",
        "--resume",
        forge(c, "last.safetensors", tensor_fn=lambda t: t.update({"train_state.optim.0.exp_avg": torch.zeros(40, 16)})),
        "--max-steps",
        "8",
    ],
)
add(
    "resume-state-moment-negative",
    r"negative|exp_avg_sq|corrupt",
    lambda c: [
        "train",
        "--resume",
        forge(c, "last.safetensors", tensor_fn=lambda t: t["train_state.optim.0.exp_avg_sq"].__setitem__((0, 0), -1.0)),
        "--max-steps",
        "8",
    ],
)
add(
    "resume-state-hidden-wrong-shape",
    r"hidden|carried state",
    lambda c: [
        "train",
        "--resume",
        forge(
            c,
            "last.safetensors",
            tensor_fn=lambda t: t.update(
                {"train_state.hidden.0": torch.zeros(2, 4, 31), "train_state.hidden.1": torch.zeros(2, 4, 31)}
            ),
        ),
        "--max-steps",
        "8",
    ],
)
add(
    "resume-state-tensors-without-record",
    r"corrupt|training.state|record",
    lambda c: ["train", "--resume", forge(c, "last.safetensors", lambda m: m.pop(_TS)), "--max-steps", "8"],
)
add("resume-best-no-train-state", r"no train(ing)? state", lambda c: ["train", "--resume", c.shared.best, "--max-steps", "8"])


def _data_dir(where: Callable[[Ctx], str]):
    def build(c: Ctx) -> Path:
        recorded = where(c)
        return forge(c, "last.safetensors", lambda m: m["provenance"].update(data_dir=recorded))

    return build


def _elsewhere(c: Ctx) -> str:
    d = c.d / "elsewhere"
    d.mkdir()
    (d / "secret.txt").write_text("not training data\n" * 2000)
    return str(d)


def _other_prepared(c: Ctx) -> str:
    """A real prepared dir, of another text than the checkpoint was trained on."""
    other = write(c, "other.txt", make_text(20000, seed=5))
    r = runner.invoke(app, ["prepare", str(other), "-o", str(c.d / "other-prepared")])
    assert r.exit_code == 0, r.output
    return str(c.d / "other-prepared")


add("resume-data-dir-elsewhere", r"prepared|data", lambda c: ["train", "--resume", _data_dir(_elsewhere)(c), "--max-steps", "8"])
add("resume-data-dir-etc", r"prepared|data", lambda c: ["train", "--resume", _data_dir(lambda c: "/etc")(c), "--max-steps", "8"])
add(
    "resume-data-dir-other-data",
    r"other data|data",
    lambda c: ["train", "--resume", _data_dir(_other_prepared)(c), "--max-steps", "8"],
)
add("eval-data-dir-elsewhere", r"prepared|meta\.json|data", lambda c: ["eval", _data_dir(_elsewhere)(c)])
add(
    "resume-data-dir-not-a-path",
    r"data_dir|corrupt|path",
    lambda c: [
        "train",
        "--resume",
        forge(c, "last.safetensors", lambda m: m["provenance"].update(data_dir=["/etc"])),
        "--max-steps",
        "8",
    ],
)


# -- training inputs ---------------------------------------------------------------------------


def _train_text(content: bytes):
    def build(c: Ctx) -> list:
        return ["train", write(c, "bad.txt", content), "--out", c.d / "out", *FAST]

    return build


def _prepare_text(content: bytes):
    def build(c: Ctx) -> list:
        return ["prepare", write(c, "bad.txt", content), "-o", c.d / "prepared"]

    return build


BINARY = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00" + bytes(range(256)) * 8
LATIN1 = "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 200
add("train-empty-file", r"empty", _train_text(b""))
add("train-binary-file", r"binary", _train_text(BINARY))
add("train-non-utf8", r"utf-8", _train_text(LATIN1))
add(
    "train-too-short",
    r"fewer than one batch|too short|batch",
    _train_text(b"too short for a batch\n"),
    new=("corpora/.cache/**",),
)
add("prepare-empty-file", r"empty", _prepare_text(b""))
add("prepare-binary-file", r"binary", _prepare_text(BINARY))
add("prepare-non-utf8", r"utf-8", _prepare_text(LATIN1))
add(
    "train-missing-input",
    r"neither|does not exist|not found",
    lambda c: ["train", c.d / "nosuch.txt", "--out", c.d / "out", *FAST],
)
add("train-empty-dir", r"no files", lambda c: (c.d / "empty").mkdir() or ["train", c.d / "empty", "--out", c.d / "out", *FAST])
add("train-no-input", r"give|input|resume", lambda c: ["train", "--out", c.d / "out", *FAST])
add("prepare-missing-input", r"neither|does not exist|not found", lambda c: ["prepare", c.d / "nosuch.txt", "-o", c.d / "p"])
add(
    "prepare-glob-matches-nothing",
    r"no files|glob",
    lambda c: write(c, "src/a.txt", make_text(2000)) and ["prepare", c.d / "src", "-o", c.d / "p", "--glob", "*.c"],
)
add("prepare-encoding-unknown", r"encoding", lambda c: ["prepare", c.shared.text, "-o", c.d / "p", "--encoding", "latin-1"])
add("prepare-tokenizer-unknown", r"tokenizer", lambda c: ["prepare", c.shared.text, "-o", c.d / "p", "--tokenizer", "wordpiece"])
add(
    "prepare-into-a-users-dir",
    r"other files|holds",
    lambda c: write(c, "mine/notes.txt", "my notes\n") and ["prepare", c.shared.text, "-o", c.d / "mine"],
)
add("prepare-into-a-file", r"file|directory", lambda c: ["prepare", c.shared.text, "-o", write(c, "afile", "x")])


# --split: bad fractions, on prepare and on train (which must not leave a cache dir behind)
for _split in ("nan,0.5,0.5", "0.9,0.1", "0.5,0.5,0.5", "-0.1,0.6,0.5", "0,0.5,0.5", "a,b,c", "inf,0,0"):
    _sid = _split.replace(",", "_")
    add(f"prepare-split-{_sid}", r"split", lambda c, s=_split: ["prepare", c.shared.text, "-o", c.d / "p", "--split", s])
add("train-split-nan", r"split", lambda c: ["train", c.shared.text, "--out", c.d / "out", "--split", "nan,0.5,0.5", *FAST])
add("train-split-two-values", r"split", lambda c: ["train", c.shared.text, "--out", c.d / "out", "--split", "0.9,0.1", *FAST])


def _reprepare(*options: str):
    """A failed prepare over a good prepared dir: the old dir must stay exactly as it was."""

    def build(c: Ctx) -> list:
        good = c.d / "prepared"
        shutil.copytree(c.shared.prepared, good)
        return ["prepare", c.shared.text, "-o", good, *options]

    return build


add("reprepare-split-nan", r"split", _reprepare("--split", "nan,0.5,0.5"))
add("reprepare-bpe-vocab-size-1", r"vocab-size|vocabulary|pieces", _reprepare("--tokenizer", "bpe", "--vocab-size", "1"))
add("reprepare-unigram-vocab-size-5", r"vocab-size|vocabulary|pieces", _reprepare("--tokenizer", "unigram", "--vocab-size", "5"))
add(
    "reprepare-binary-input",
    r"binary",
    lambda c: _reprepare()(c) and ["prepare", write(c, "bin.txt", BINARY), "-o", c.d / "prepared"],
)


# -- training options: flags and --config ----------------------------------------------------


def _train(*options: str, out: str = "out"):
    def build(c: Ctx) -> list:
        return ["train", c.shared.prepared, "--out", c.d / out, *FAST, "--max-steps", "3", *options]

    return build


def _config(text: bytes | str, *options: str):
    def build(c: Ctx) -> list:
        return [
            "train",
            c.shared.prepared,
            "--out",
            c.d / "out",
            *FAST,
            "--max-steps",
            "3",
            "--config",
            write(c, "c.yaml", text),
            *options,
        ]

    return build


add("train-seed-2^63", r"seed", _train("--seed", str(MAX_COUNT + 1)))
add("train-seed-10^30", r"seed", _train("--seed", str(10**30)))
add("train-seed-negative", r"seed", _train("--seed", "-1"))
add("train-max-epochs-inf", r"max_epochs|max-epochs|finite", _train("--max-epochs", "inf"))
add("train-max-epochs-nan", r"max_epochs|max-epochs|finite", _train("--max-epochs", "nan"))
add("train-rnn-size-absurd", r"rnn_size|rnn-size|parameters", _train("--rnn-size", str(10**12)))
add("train-rnn-size-10^30", r"rnn_size|rnn-size|parameters", _train("--rnn-size", str(10**30)))
add("train-num-layers-0", r"num_layers|num-layers", _train("--num-layers", "0"))
add("train-num-layers-huge", r"num_layers|num-layers|parameters", _train("--num-layers", str(10**12)))
add("train-too-many-parameters", r"parameters", _train("--rnn-size", "16384", "--num-layers", "64"))
add("train-batch-size-0", r"batch_size|batch-size", _train("--batch-size", "0"))
add("train-lr-nan", r"lr|finite", _train("--lr", "nan"))
add("train-lr-negative", r"lr", _train("--lr", "-0.1"))
add("train-dropout-1.5", r"dropout", _train("--dropout", "1.5"))
add("train-time-budget-soon", r"duration|time", _train("--time-budget", "soon"))
add("train-max-steps-0", r"max_steps|max-steps", _train("--max-steps", "0"))
add("train-eval-every-0", r"eval_every|eval-every", _train("--eval-every", "0"))
add("train-unknown-cell", r"cell", _train("--cell", "transformer"))
add("train-unknown-schedule", r"schedule", _train("--schedule", "linear"))
add("train-unknown-device", r"device", _train("--device", "tpu"))
add("train-unknown-dtype", r"dtype", _train("--dtype", "fp8"))
add("train-dtype-bf16-no-bf16-cpu", r"bf16", _train("--dtype", "bf16"), skip=no_bf16)
add(
    "train-device-cuda-absent",
    r"cuda",
    _train("--device", "cuda"),
    skip=lambda: "this machine has CUDA" if torch.cuda.is_available() else None,
)
add("train-unknown-preset", r"preset", _train("--preset", "nosuch"))
add("train-unknown-backend", r"backend", _train("--backend", "mpi"))
add("train-nproc-0", r"nproc", _train("--nproc", "0"))
add("train-out-is-a-file", r"file|directory", lambda c: write(c, "afile", "x") and _train(out="afile")(c))
add("config-non-utf8", r"utf-8", _config(b"rnn_size: 32\n# caf\xe9\n"))
add("config-key-not-a-string", r"option names|key|text", _config("1: 64\nrnn_size: 32\n"))
add("config-key-a-list", r"option names|key|text|mapping", _config("? [a, b]\n: 1\n"))
add("config-unknown-key", r"unknown key|learning_rate", _config("learning_rate: 0.1\n"))
add("config-not-a-mapping", r"mapping", _config("- rnn_size\n- 64\n"))
add("config-nested-value", r"single value|rnn_size", _config("rnn_size: {a: 1}\n"))
add("config-seed-2^63", r"seed", _config(f"seed: {MAX_COUNT + 1}\n"))
add("config-lr-a-word", r"\blr\b|float|number", _config("lr: fast\n"))
add("config-boolean-as-number", r"num_layers|int", _config("num_layers: yes\n"))
add("config-invalid-yaml", r"yaml", _config("rnn_size: [1, 2\n"))
add("config-missing", r"does not exist|no such|not found", lambda c: _train("--config", str(c.d / "nosuch.yaml"))(c))
add("config-deep-nesting", r"nest|mapping|single value|yaml", _config("a: " + "[" * 5000 + "]" * 5000 + "\n"))


# -- resume, init-from, --out ------------------------------------------------------------------


def _resume_copy(*options: str):
    def build(c: Ctx) -> list:
        return ["train", "--resume", copy_run(c) / "last.safetensors", *options]

    return build


add("resume-conflicting-rnn-size", r"rnn-size|rnn_size", _resume_copy("--rnn-size", "64", "--max-steps", "8"))
add("resume-conflicting-cell", r"cell", _resume_copy("--cell", "gru", "--max-steps", "8"))
add("resume-conflicting-seed", r"seed", _resume_copy("--seed", "9", "--max-steps", "8"))
add("resume-and-init-from", r"not both|init-from", lambda c: _resume_copy("--init-from", str(c.shared.best))(c))
add("resume-auto-without-out", r"--out", lambda c: ["train", c.shared.prepared, "--resume", "auto", *FAST])
add(
    "resume-missing-in-a-run-dir",
    r"does not exist|no such|not found",
    lambda c: ["train", "--resume", c.d / "run" / "last.safetensors"],
)
add(
    "init-from-another-size",
    r"init-from|fit|shape",
    lambda c: [
        "train",
        c.shared.prepared,
        "--out",
        c.d / "new",
        "--init-from",
        c.shared.best,
        "--max-steps",
        "3",
        *FAST[2:],
        "--rnn-size",
        "48",
    ],
)
add("init-from-missing", r"does not exist|no such", lambda c: _train("--init-from", str(c.d / "nosuch.safetensors"))(c))
add(
    "out-holds-another-run",
    r"another run|overwrite",
    lambda c: ["train", c.shared.prepared, "--out", copy_run(c), *FAST, "--max-steps", "3"],
)


# -- sample, beam: decoding options -----------------------------------------------------------


def _sample(*options, checkpoints: int = 1):
    def build(c: Ctx) -> list:
        return ["sample", *[c.shared.best] * checkpoints, "--length", "10", "--seed", "1", *options]

    return build


def _beam(*options, checkpoints: int = 1):
    def build(c: Ctx) -> list:
        return ["beam", *[c.shared.best] * checkpoints, "--length", "10", *options]

    return build


def _with_file(name: str, content: bytes | str, flag: str, make: Callable, *options):
    def build(c: Ctx) -> list:
        return make(flag, write(c, name, content), *options)(c)

    return build


for _name, _make, _stream in (("sample", _sample, True), ("beam", _beam, False)):
    add(f"{_name}-prime-outside-vocabulary", r"vocabulary", _make("--prime", "Zebra \u2713"), stream=_stream)
    add(
        f"{_name}-prime-and-prime-file",
        r"not both|prime",
        _with_file("p.txt", "The ", "--prime-file", _make, "--prime", "The "),
        stream=_stream,
    )
    add(
        f"{_name}-prime-file-missing",
        r"does not exist|no such",
        lambda c, m=_make: m("--prime-file", str(c.d / "nosuch.txt"))(c),
        stream=_stream,
    )
    add(f"{_name}-prime-file-a-directory", r"directory", lambda c, m=_make: m("--prime-file", str(c.d))(c), stream=_stream)
    add(f"{_name}-prime-file-not-utf8", r"utf-8", _with_file("p.txt", LATIN1[:40], "--prime-file", _make), stream=_stream)
    add(
        f"{_name}-prime-file-outside-vocabulary",
        r"vocabulary",
        _with_file("p.txt", "The \u2713\n", "--prime-file", _make),
        stream=_stream,
    )
    add(f"{_name}-length-negative", r"length", _make("--length", "-1"), stream=_stream)
    add(f"{_name}-weights-zero", r"weights", _make("--weights", "0,1", checkpoints=2), stream=_stream)
    add(f"{_name}-weights-inf", r"weights", _make("--weights", "inf,1", checkpoints=2), stream=_stream)
    add(f"{_name}-weights-count", r"weights", _make("--weights", "1,2"), stream=_stream)
    add(f"{_name}-weights-not-numbers", r"weights", _make("--weights", "a,b", checkpoints=2), stream=_stream)
    add(f"{_name}-weights-nan", r"weights", _make("--weights", "nan,1", checkpoints=2), stream=_stream)
    add(f"{_name}-combine-unknown", r"combine", _make("--combine", "median", checkpoints=2), stream=_stream)
    add(f"{_name}-dtype-unknown", r"dtype", _make("--dtype", "int4"), stream=_stream)
    add(f"{_name}-dtype-bf16-no-bf16-cpu", r"bf16", _make("--dtype", "bf16"), stream=_stream, skip=no_bf16)
    add(f"{_name}-unknown-mode", r"unknown", _make("--unknown", "replace"), stream=_stream)
    # Members of different character vocabularies join over the union (decoding/union.py), under the mean rule only.
    add(
        f"{_name}-ensemble-vocab-mismatch-geometric",
        r"geometric.*vocabulary",
        lambda c, m=_make: (
            m()(c)[:2]
            + [
                forge(
                    c,
                    "other-vocab.safetensors",
                    lambda meta: meta["vocab"].update(chars=meta["vocab"]["chars"][:-1] + "~"),
                    src=c.shared.best,
                )
            ]
            + m()(c)[2:]
            + ["--combine", "geometric"]
        ),
        stream=_stream,
    )

add("sample-temperature-0", r"temperature.*greedy", _sample("--temperature", "0"), stream=True)
add("sample-temperature-negative", r"temperature", _sample("--temperature", "-0.5"), stream=True)
add("sample-temperature-1e-320", r"temperature", _sample("--temperature", "1e-320"), stream=True)
add("sample-temperature-nan", r"temperature", _sample("--temperature", "nan"), stream=True)
add("sample-temperature-inf", r"temperature", _sample("--temperature", "inf"), stream=True)
add("sample-top-k-0", r"top-k|top_k", _sample("--top-k", "0"), stream=True)
add("sample-top-p-nan", r"top-p|top_p", _sample("--top-p", "nan"), stream=True)
add("sample-top-p-0", r"top-p|top_p", _sample("--top-p", "0"), stream=True)
add("sample-top-p-1.5", r"top-p|top_p", _sample("--top-p", "1.5"), stream=True)
add("sample-num-samples-0", r"num-samples|samples", _sample("--num-samples", "0"), stream=True)
add("sample-seed-2^64", r"seed", _sample("--seed", str(1 << 64)), stream=True)
add("sample-device-unknown", r"device", _sample("--device", "tpu"), stream=True)
add("beam-width-0", r"beam-width|width", _beam("--beam-width", "0"))
add("beam-n-best-above-width", r"n-best", _beam("--beam-width", "5", "--n-best", "6"))
add("beam-n-best-0", r"n-best", _beam("--n-best", "0"))
add("beam-length-penalty-nan", r"length-penalty|penalty", _beam("--length-penalty", "nan"))
add("beam-length-penalty-inf", r"length-penalty|penalty", _beam("--length-penalty", "inf"))
add("beam-length-penalty-1e308", r"length-penalty|penalty", _beam("--length-penalty", "1e308"))
add("beam-length-0", r"length", _beam("--length", "0"))
add("beam-stop-at-outside-vocabulary", r"vocabulary", _beam("--stop-at", "\u2713"))

# Usage errors, through the real entry point (click's own messages, as one line).
add(
    "main-sample-length-not-a-number",
    r"length|integer|int",
    lambda c: _sample()(c) + ["--length", "ten"],
    via="main",
    stream=True,
)
add(
    "main-train-unknown-flag",
    r"no such option|--no-such-flag",
    lambda c: ["train", c.shared.prepared, "--no-such-flag"],
    via="main",
)
add("main-beam-width-a-fraction", r"beam-width|integer|int", _beam("--beam-width", "1.5"), via="main")
add("main-unknown-command", r"no such command|frobnicate", lambda c: ["frobnicate"], via="main")


# -- eval ----------------------------------------------------------------------------------------


def _eval(*options):
    def build(c: Ctx) -> list:
        return ["eval", c.shared.best, *options]

    return build


add("eval-split-nosuch", r"split", _eval("--split", "nosuch"))
add("eval-split-val-plus-nosuch", r"split", _eval("--split", "val+nosuch"))
add("eval-text-missing", r"does not exist|no such", lambda c: _eval("--text", str(c.d / "nosuch.txt"))(c))
add("eval-text-empty", r"empty|fewer", _with_file("e.txt", b"", "--text", _eval))
add("eval-text-binary", r"binary|utf-8|vocabulary", _with_file("b.txt", BINARY, "--text", _eval))
add("eval-text-one-char", r"fewer than 2|characters", _with_file("one.txt", "a", "--text", _eval))
add("eval-text-a-directory", r"directory", lambda c: _eval("--text", str(c.d))(c))
add("eval-text-outside-vocabulary", r"vocabulary", _with_file("u.txt", "The \u2713 is unseen\n", "--text", _eval))
add(
    "eval-data-not-prepared",
    r"prepared|meta\.json",
    lambda c: (c.d / "nodata").mkdir() or _eval("--data", str(c.d / "nodata"))(c),
)
add("eval-dtype-int8", r"int8", _eval("--dtype", "int8"))
add("eval-unknown-mode", r"unknown", _eval("--unknown", "replace"))
add("eval-weights-negative", r"weights", lambda c: _eval(str(c.shared.best), "--weights", "-1,2")(c))


# -- plot, corpus --------------------------------------------------------------------------------


def _run_dir(metrics: bytes | str | None):
    def build(c: Ctx) -> list:
        d = c.d / "rundir"
        d.mkdir()
        if metrics is not None:
            write(c, "rundir/metrics.jsonl", metrics)
        return ["plot", d]

    return build


add("plot-dir-without-metrics", r"metrics", _run_dir(None))
add("plot-missing-dir", r"not a directory|does not exist", lambda c: ["plot", c.d / "nosuch"])
add("plot-a-file", r"not a directory", lambda c: ["plot", c.shared.best])
add("plot-metrics-not-json", r"not json|metrics", _run_dir("step,loss\n1,2.0\n"))
add("plot-metrics-no-records", r"no train or val|records", _run_dir('{"kind": "start"}\n'))
add("plot-metrics-only-a-torn-line", r"no train or val|records|json", _run_dir('{"kind": "tra'))
add("plot-out-not-png", r"png", lambda c: ["plot", c.shared.run, "--out", c.d / "loss.jpg"])
add("corpus-get-unknown", r"unknown corpus", lambda c: ["corpus", "get", "nosuch"])
add("corpus-get-subset-without-from", r"--from", lambda c: ["corpus", "get", "shakespeare", "--subset", "kernel"])
add(
    "corpus-get-from-and-mirror",
    r"not both|--from|--mirror",
    lambda c: ["corpus", "get", "linux", "--from", c.d, "--mirror", c.d],
)


def _bad_registry(c: Ctx) -> list:
    (Path(os.environ["CHARLM_CORPORA_DIR"]) / "broken.yaml").write_text("name: [unclosed\n")
    return ["corpus", "list"]


add("corpus-list-broken-registry-file", r"broken|yaml|corpus|registry", _bad_registry)


# -- Hardening II: locales, bytes that are not UTF-8, owned run dirs, odd paths (issue 28) ----------

ASCII = {"PYTHONIOENCODING": "ascii"}
POSIX = {"PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "POSIX", "LANG": "", "PYTHONIOENCODING": ""}
NOT_UTF8 = os.fsdecode(b"t\xfd")  # a name's byte 0xFD as Python passes it on (surrogateescape)

# An error line with characters the locale cannot encode: escaped, still one line.
for _env_id, _env in (("ascii", ASCII), ("posix", POSIX)):
    add(
        f"{_env_id}-sample-prime-outside-vocabulary",
        r"vocabulary",
        _sample("--prime", "Se\u00f1or \u2713"),
        via="process",
        env=_env,
        stream=True,
    )
    add(f"{_env_id}-beam-prime-outside-vocabulary", r"vocabulary", _beam("--prime", "Se\u00f1or \u2713"), via="process", env=_env)
    add(
        f"{_env_id}-eval-text-outside-vocabulary",
        r"vocabulary",
        _with_file("u.txt", "The \u2713 is unseen\n", "--text", _eval),
        via="process",
        env=_env,
    )
# Arguments holding bytes that are not UTF-8: an error that names the byte.
add(
    "process-sample-prime-undecodable-byte",
    r"byte 0xFF",
    _sample("--prime", "AB" + os.fsdecode(b"\xff")),
    via="process",
    stream=True,
)
add(
    "process-sample-prime-undecodable-skip",
    r"byte 0xFF",
    _sample("--prime", "AB" + os.fsdecode(b"\xff"), "--unknown", "skip"),
    via="process",
    stream=True,
)
add("process-beam-prime-undecodable-byte", r"byte 0xFF", _beam("--prime", os.fsdecode(b"A\xff")), via="process")
add("process-beam-stop-at-undecodable-byte", r"--stop-at.*byte 0xFF", _beam("--stop-at", os.fsdecode(b"\xff")), via="process")
# File names that are not UTF-8: shown escaped.
add(
    "process-prepare-not-utf8-name-missing",
    r"t\\xfd\.txt is neither",
    lambda c: ["prepare", c.d / f"{NOT_UTF8}.txt", "-o", c.d / "p"],
    via="process",
)
add(
    "process-prepare-not-utf8-name-binary",
    r"t\\xfd\.bin looks like a binary",
    lambda c: ["prepare", write(c, f"{NOT_UTF8}.bin", BINARY), "-o", c.d / "p"],
    via="process",
)
add(
    "process-train-not-utf8-name-latin1",
    r"t\\xfd\.txt is not valid UTF-8",
    lambda c: ["train", write(c, f"{NOT_UTF8}.txt", LATIN1), "--out", c.d / "out", *FAST],
    via="process",
)
add("eval-text-only-a-bom", r"empty", _with_file("bom.txt", b"\xef\xbb\xbf", "--text", _eval))


def _dangling(c: Ctx) -> Path:
    link = c.d / "dangling"
    link.symlink_to(c.d / "nowhere")
    return link


def _held(c: Ctx) -> Path:
    """A run dir whose lock this process holds, as a live training would (released when the test's process ends)."""
    import fcntl

    from charlm.training import runlock

    out = copy_run(c)
    fd = os.open(out / runlock.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD.append(fd)
    return out


_HELD: list[int] = []
add(
    "train-out-dangling-symlink",
    r"symbolic link.*does not exist",
    lambda c: ["train", c.shared.prepared, "--out", _dangling(c), *FAST, "--max-steps", "3"],
)
add("prepare-out-dangling-symlink", r"symbolic link.*does not exist", lambda c: ["prepare", c.shared.text, "-o", _dangling(c)])
add("train-out-a-file", r"is a file", lambda c: ["train", c.shared.prepared, "--out", write(c, "afile", "x"), *FAST])
add(
    "train-out-under-a-file",
    r"cannot create --out",
    lambda c: ["train", c.shared.prepared, "--out", write(c, "afile", "x") / "run", *FAST],
)
add(
    "train-out-in-use",
    r"in use by process \d+; wait or choose another --out",
    lambda c: ["train", c.shared.prepared, "--out", _held(c), *FAST, "--max-steps", "3"],
)
add(
    "train-resume-auto-out-in-use",
    r"in use by process",
    lambda c: ["train", c.shared.prepared, "--out", _held(c), *FAST, "--max-steps", "8", "--resume", "auto"],
)
add(
    "train-overwrite-out-in-use",
    r"in use by process",
    lambda c: [  # --overwrite deletes nothing of a live run
        "train",
        c.shared.prepared,
        "--out",
        _held(c),
        *FAST,
        "--max-steps",
        "3",
        "--overwrite",
    ],
)
add("prepare-out-name-too-long", r"too long", lambda c: ["prepare", c.shared.text, "-o", c.d / ("n" * 256)])
add(
    "train-nproc-more-memory-than-there-is",
    r"--nproc 100000: the ranks would need about .* use --nproc \d+ or fewer",
    lambda c: ["train", c.shared.prepared, "--out", c.d / "out", *FAST, "--nproc", "100000"],
)


def _mirror(c: Ctx) -> Path:
    write(c, "mirror/shakespeare/input.txt", "x")
    return c.d / "mirror"


add(
    "corpus-get-corpora-dir-not-writable",
    r"cannot write .*corpora-dir",
    lambda c: ["--corpora-dir", write(c, "afile", "x"), "corpus", "get", "shakespeare", "--mirror", _mirror(c)],
)
add(
    "train-corpora-dir-not-writable",
    r"prepare cache.*corpora-dir",
    lambda c: ["--corpora-dir", write(c, "afile", "x"), "train", c.shared.text, "--out", c.d / "out", *FAST],
)


# -- running a case ------------------------------------------------------------------------------


@dataclass
class Outcome:
    exit_code: int | None
    stdout: str
    stderr: str
    exception: BaseException | None = None
    trace: str = ""


def _visible(w: warnings.WarningMessage) -> bool:
    """Whether Python would print this warning in a real process (deprecations are hidden by default)."""
    return not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning))


def _invoke_runner(argv: list[str], case: Case | None = None) -> Outcome:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = runner.invoke(app, argv)
    shown = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in seen if _visible(w))
    trace = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info and not isinstance(r.exception, SystemExit) else ""
    return Outcome(r.exit_code, r.stdout, shown + r.stderr, r.exception, trace)


def _invoke_main(argv: list[str], case: Case | None = None) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    code, exc, trace = 0, None, ""
    with warnings.catch_warnings(record=True) as seen, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            exc = e
        except BaseException as e:  # noqa: BLE001 - reported as the failure it is
            code, exc, trace = None, e, traceback.format_exc()
    shown = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in seen if _visible(w))
    return Outcome(code, out.getvalue(), shown + err.getvalue(), exc, trace)


def _invoke_process(argv: list[str], case: Case | None = None) -> Outcome:
    """python -m charlm.entry (the console script's entry point); its output read as UTF-8, bytes that are not shown as U+FFFD."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **((case and case.env) or {})}
    try:
        r = subprocess.run([sys.executable, "-m", "charlm.entry", *argv], capture_output=True, env=env, timeout=120)
    except subprocess.TimeoutExpired as e:
        return Outcome(None, str(e.stdout or ""), str(e.stderr or ""), None, "the command hung: killed after 120 s")
    out, err = r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    return Outcome(r.returncode, out, err, SystemExit(r.returncode), "")


INVOKERS = {"runner": _invoke_runner, "main": _invoke_main, "process": _invoke_process}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under the roots: a file's sha256, 'dir', or a link's target."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                key = str(p)
                if p.is_symlink():
                    out[key] = "link:" + os.readlink(p)
                elif p.is_dir():
                    out[key] = "dir"
                else:
                    out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _allowed_new(path: str, tmp_path: Path, allowed: tuple[str, ...]) -> bool:
    try:
        rel = str(Path(path).relative_to(tmp_path))
    except ValueError:
        return False  # nothing new in the shared run, ever
    if rel == "corpora/.cache" and Path(path).is_dir() and not any(Path(path).iterdir()):
        return True  # the cache's (empty) parent: not a cache dir of its own
    return any(fnmatch.fnmatch(rel, g) or rel == g.rstrip("/*") for g in allowed)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, shared: Shared, tmp_path: Path):
    if case.skip and (reason := case.skip()):
        pytest.skip(reason)
    d = tmp_path / "case"
    d.mkdir()
    argv = [str(a) for a in case.build(Ctx(d, shared))]
    before = snapshot(tmp_path, shared.root)

    r = INVOKERS[case.via](argv, case)

    shown = f"charlm {' '.join(argv)}\n--- exit {r.exit_code}\n--- stdout:\n{r.stdout[-2000:]}\n--- stderr:\n{r.stderr[-3000:]}\n{r.trace}"
    assert r.exit_code == 1, shown
    assert isinstance(r.exception, SystemExit), shown  # CliRunner turns an escaped exception into exit code 1
    assert "Traceback" not in r.stdout + r.stderr, shown
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: "), shown
    assert re.search(case.pattern, lines[0], re.IGNORECASE), f"expected /{case.pattern}/ in: {lines[0]}"
    if not case.stream:
        assert r.stdout == "", shown

    after = snapshot(tmp_path, shared.root)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"changed or removed by a failed command: {changed[:10]}\n{shown}"
    appeared = sorted(p for p in after if p not in before and not _allowed_new(p, tmp_path, case.new))
    assert not appeared, f"left behind by a failed command: {appeared[:10]}\n{shown}"


def test_huge_equal_weights_are_equal_weights(shared):
    """--weights 1e308,1e308 (a traceback once) is a valid choice: the same as 1,1."""
    two = [str(shared.best)] * 2
    huge = runner.invoke(app, ["sample", *two, "--length", "20", "--seed", "3", "--weights", "1e308,1e308"])
    plain = runner.invoke(app, ["sample", *two, "--length", "20", "--seed", "3", "--weights", "1,1"])
    assert huge.exit_code == 0 and plain.exit_code == 0, huge.output + plain.output
    assert huge.stdout == plain.stdout


def test_the_table_is_big_enough_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 60
