"""A seeded checkpoint fuzzer: corrupted and hostile files made from good ones, and the oracle that judges them.

Shared by tests/test_fuzz_checkpoints.py (a few hundred cases) and benchmarks/fuzz_checkpoints.py
(thousands). Every case goes through checkpoint.load, and optionally through the CLI commands
info, sample, eval --text and train --resume. A case passes when it ends in

- a clean error: CharlmError from load; exit code 1 with exactly one line on stderr starting
  "error: " and no traceback from the CLI; or
- success that is indistinguishable from the good file it was made from: the same weights and
  vocabulary, the same sampled text, the same evaluation, the same weights after resuming.

Anything else is a failure: another exception, a warning, a second line on stderr, a run past
the time limit, a refused file that is in fact valid, or a success whose output differs from the
original's (silent garbage). Cases are generated from (seed, index) alone, so a failure is
reproduced by its number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import signal
import struct
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import typer.main
import typer.testing
from conftest import make_text
from typer.testing import CliRunner

from charlm import CharlmError, checkpoint
from charlm.cli import app
from charlm.config import ModelConfig, TrainConfig
from charlm.data import PreparedData
from charlm.data import prepare as prep
from charlm.training.trainer import Trainer

NAN, INF = float("nan"), float("inf")
HUGE_DIGITS = "9" * 5000  # past Python's int-from-text limit (4300 digits)
CASE_SECONDS = 60  # a case running longer is a hang

# -- the file, taken apart and put back together ------------------------------------------------


@dataclass
class Parts:
    """A safetensors file as editable pieces."""

    metadata: dict  # __metadata__: str -> str
    meta: dict  # the parsed `meta` JSON
    tensors: dict  # name -> [dtype, shape list, raw bytes]


def split(blob: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8 : 8 + n], blob[8 + n :]


def join(header_text: bytes, data: bytes, pad: bool = True) -> bytes:
    if pad:  # as safetensors writes it: the data starts at a multiple of 8
        header_text += b" " * (-(8 + len(header_text)) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + data


def decompose(blob: bytes) -> Parts:
    _, text, data = split(blob)
    header = json.loads(text)
    metadata = header.pop("__metadata__")
    tensors = {k: [v["dtype"], list(v["shape"]), data[v["data_offsets"][0] : v["data_offsets"][1]]] for k, v in header.items()}
    return Parts(metadata=dict(metadata), meta=json.loads(metadata["meta"]), tensors=tensors)


def sign(metadata: dict, tensors: dict) -> None:
    """Recompute the checksums as docs/checkpoint-format.md defines them (an implementation independent of charlm's)."""
    names = sorted(tensors)
    weights = hashlib.sha256(b"".join(tensors[k][2] for k in names if k.startswith("model.")))
    record = hashlib.sha256(metadata["meta"].encode("utf-8", "surrogatepass"))
    for k in names:
        if not k.startswith("model."):
            record.update(tensors[k][2])
    metadata["weights_sha256"] = weights.hexdigest()
    metadata["record_sha256"] = record.hexdigest()


def compose(
    parts: Parts, signed: bool = True, meta_text: str | None = None, order: list[str] | None = None, indent: int | None = None
) -> bytes:
    """A well-formed safetensors file of these parts; signed: with checksums that match."""
    metadata = dict(parts.metadata)
    metadata["meta"] = meta_text if meta_text is not None else json.dumps(parts.meta, ensure_ascii=False)
    if signed:
        sign(metadata, parts.tensors)
    header: dict = {"__metadata__": metadata}
    data, offset = [], 0
    for name in order or sorted(parts.tensors):
        dtype, shape, raw = parts.tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    return join(json.dumps(header, indent=indent).encode(), b"".join(data))


def reencode(raw: bytes, src: str, dst: str) -> bytes:
    dtypes = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "I64": torch.int64,
        "U8": torch.uint8,
    }
    t = torch.frombuffer(bytearray(raw), dtype=dtypes[src]) if raw else torch.zeros(0, dtype=dtypes[src])
    return t.to(dtypes[dst]).view(torch.uint8).numpy().tobytes()


# -- the cases --------------------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    family: str
    note: str
    data: bytes
    # any: a clean error or an identical success; error: load must refuse it; success: must load, identical;
    # other: a valid file that differs from its base (must load; its outputs are not compared)
    expect: str = "any"
    base: str = ""


class Mutation:
    """What a family function returns."""

    def __init__(self, data: bytes, note: str, expect: str = "any"):
        self.data, self.note, self.expect = data, note, expect


def _flip(rng: random.Random, blob: bytes, lo: int, hi: int, note: str) -> Mutation:
    out = bytearray(blob)
    k = rng.randint(1, 4)
    spots = []
    for _ in range(k):
        i = rng.randrange(lo, hi)
        out[i] ^= rng.randint(1, 255)
        spots.append(i)
    return Mutation(bytes(out), f"{note} at {spots}")


def flip_header(rng, blob, parts):
    n, _, _ = split(blob)
    return _flip(rng, blob, 8, 8 + n, "header bytes flipped")


def flip_data(rng, blob, parts):
    n, _, _ = split(blob)
    return _flip(rng, blob, 8 + n, len(blob), "data bytes flipped")


def flip_meta(rng, blob, parts):
    n, text, _ = split(blob)
    start = text.find(b'"meta"')
    return _flip(rng, blob, 8 + start, 8 + start + len(parts.metadata["meta"]), "meta text bytes flipped")


def flip_length(rng, blob, parts):
    return _flip(rng, blob, 0, 8, "header length bytes flipped")


def truncate(rng, blob, parts):
    n, _, _ = split(blob)
    cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(8, 8 + n), 8 + n, rng.randrange(8 + n, len(blob)), len(blob) - 1])
    return Mutation(blob[:cut], f"truncated to {cut} of {len(blob)} bytes")


def header_length(rng, blob, parts):
    n, _, _ = split(blob)
    value = rng.choice(
        [
            0,
            1,
            2,
            n - 1,
            n + 1,
            n + 8,
            n - 8,
            len(blob),
            len(blob) - 8,
            1 << 31,
            (1 << 63) + 5,
            (1 << 64) - 1,
            rng.randrange(1 << 64),
        ]
    )
    return Mutation(struct.pack("<Q", value % (1 << 64)) + blob[8:], f"header length set to {value}")


def trailing(rng, blob, parts):
    junk = rng.choice([b"\0", b"x" * 9, bytes(rng.randrange(256) for _ in range(100))])
    return Mutation(blob + junk, f"{len(junk)} bytes appended")


def foreign(rng, blob, parts):
    import io
    import pickle
    import zipfile

    kind = rng.choice(["pickle", "zip", "empty", "text", "random", "plain-safetensors", "torch-save", "json"])
    if kind == "pickle":
        data = pickle.dumps({"w": [1.0, 2.0]})
    elif kind in ("zip", "torch-save"):
        buf = io.BytesIO()
        if kind == "zip":
            with zipfile.ZipFile(buf, "w") as z:
                z.writestr("data.pkl", b"not really")
        else:
            torch.save({"w": torch.zeros(3)}, buf)
        data = buf.getvalue()
    elif kind == "empty":
        data = b""
    elif kind == "text":
        data = b"hello, this is not a checkpoint\n" * rng.randint(1, 50)
    elif kind == "random":
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4000)))
    elif kind == "json":
        data = json.dumps({"model": {}}).encode()
    else:
        from safetensors.torch import save

        data = save({"w": torch.zeros(3)})
    return Mutation(data, f"a {kind} file", "error")


HOSTILE_HEADERS = [
    b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 50000 + b"1" + b"}" * 50000,
    b'{"__metadata__": {"format": "charlm-checkpoint"}, "x": {"dtype": "F32", "shape": ['
    + HUGE_DIGITS.encode()
    + b'], "data_offsets": [0, 4]}}',
    b'{"__metadata__": {"format": "charlm-checkpoint"}, "x": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
    b'{"__metadata__": {"format": "charlm-checkpoint"}, "x": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',
    b"[]",
    b'"a string"',
    b"42",
    b"null",
    b"true",
    b"{}",
    b"{",
    b"}",
    b"",
    b"   ",
    b"\xff\xfe{}",
    b'{"a": "\xc3\x28"}',
    b'{"__metadata__": []}',
    b'{"__metadata__": "text"}',
    b'{"__metadata__": 3}',
    b'{"__metadata__": null}',
    b'{"__metadata__": {"format": 1}}',
    b'{"__metadata__": {"format": ["charlm-checkpoint"]}}',
    b'{"__metadata__": {"format": "charlm-checkpoint", "format_version": "1"}, "__metadata__": {}}',
    b'{"__metadata__": {"format": "charlm-checkpoint", "format_version": "1", "meta": "{}"}}',
    b'{"__metadata__": {"format": "charlm-checkpoint", "format_version": "1", "meta": "[]"}}',
]


def header_json(rng, blob, parts):
    _, _, data = split(blob)
    text = rng.choice(HOSTILE_HEADERS)
    return Mutation(join(text, data, pad=False), f"header replaced by {text[:40]!r}", "error")


def entry_structure(rng, blob, parts):
    n, text, data = split(blob)
    header = json.loads(text)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    what = rng.choice(["not-dict", "missing", "extra", "dtype", "shape", "offsets", "metadata-value"])
    if what == "not-dict":
        header[name] = rng.choice([[], "F32", 3, None, [entry["dtype"], entry["shape"], entry["data_offsets"]]])
    elif what == "missing":
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif what == "extra":
        entry[rng.choice(["offset", "dtype2", ""])] = 1
    elif what == "dtype":
        entry["dtype"] = rng.choice(["f32", "F31", "FLOAT", "", 32, None, ["F32"], "BOOL", "U16", "F8_E4M3", "C64"])
    elif what == "shape":
        entry["shape"] = rng.choice(
            [
                [-1],
                [1.5],
                [True],
                ["3"],
                None,
                3,
                [1 << 62],
                [2] * 40,
                [0],
                [],
                [-(1 << 70)],
                entry["shape"][::-1] + [1],
                "__HUGE__",
            ]
        )
    elif what == "offsets":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [
                [],
                [b],
                [b, e, e],
                [e, b],
                [b, e + 4],
                [b + 4, e + 4],
                [-4, e],
                [b, 1 << 70],
                None,
                "0,4",
                [str(b), e],
                [b * 1.0, e],
                [True, e],
                "__HUGE__",
                [0, e - b],
            ]
        )
    else:
        key = rng.choice(list(header["__metadata__"]))
        header["__metadata__"][key] = rng.choice([1, None, [], {}, 2.5, True])
    out = json.dumps(header).replace('"__HUGE__"', HUGE_DIGITS).encode()
    return Mutation(join(out, data), f"tensor entry {name}: {what}")


def offsets_layout(rng, blob, parts):
    names = sorted(parts.tensors)
    kind = rng.choice(["overlap", "gap", "swap", "beyond", "zero-size"])
    header = {"__metadata__": parts.metadata}
    offset, data = 0, []
    for k in names:
        dtype, shape, raw = parts.tensors[k]
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    victim = rng.choice(names)
    b, e = header[victim]["data_offsets"]
    if kind == "overlap" and b >= 4:
        header[victim]["data_offsets"] = [b - 4, e - 4]
    elif kind == "gap":
        header[victim]["data_offsets"] = [b + 4, e + 4]
    elif kind == "swap":
        other = rng.choice(names)
        header[victim]["data_offsets"], header[other]["data_offsets"] = (
            header[other]["data_offsets"],
            header[victim]["data_offsets"],
        )
    elif kind == "beyond":
        header[victim]["data_offsets"] = [offset, offset + (e - b)]
    else:
        header[victim]["shape"] = [0] + header[victim]["shape"]
        header[victim]["data_offsets"] = [b, b]
    # a swap of two tensors of equal size is a valid file whose weights differ: the checksum must catch it
    return Mutation(join(json.dumps(header).encode(), b"".join(data)), f"offsets of {victim}: {kind}")


HOSTILE_META = [
    "",
    "not json",
    "[" * 100000,
    '{"a":' * 50000 + "1" + "}" * 50000,
    "[]",
    "null",
    "3",
    '"text"',
    '{"model": ' + HUGE_DIGITS + "}",
    "NaN",
    '{"model": {}, "model": {}}',
    "{",
    "\ud800",
]


def meta_text(rng, blob, parts):
    text = rng.choice(HOSTILE_META)
    signed = rng.random() < 0.8
    return Mutation(
        compose(parts, signed=signed, meta_text=text), f"meta text {text[:30]!r} ({'signed' if signed else 'unsigned'})", "error"
    )


BAD_SECTION = [None, [], "text", 3, True, [{"cell": "lstm"}]]


def sections(rng, blob, parts):
    meta = json.loads(json.dumps(parts.meta))
    name = rng.choice(
        ["model", "train", "vocab", "tokenizer", "metrics", "provenance"] + (["train_state"] if "train_state" in meta else [])
    )
    removed = rng.random() < 0.3 and name in ("model", "train", "vocab")
    if removed:
        del meta[name]
    else:
        meta[name] = rng.choice(BAD_SECTION)
    signed = rng.random() < 0.8
    p = dataclasses.replace(parts, meta=meta)
    return Mutation(compose(p, signed=signed), f"section {name} {'removed' if removed else repr(meta[name])}", "error")


def _invalid_values(kind: str, optional: bool) -> list:
    """Values a field of this kind must never accept (so that a load that succeeds is a failure)."""
    common = [[], {}, [1], {"a": 1}]
    if kind == "str":
        return common + ["nope", "", 1, None, True]
    if kind == "bool":
        return common + ["yes", 1, 0, None, 2.5]
    values = common + ["x", True, False, NAN, INF, -INF, -1, -1e300, "__HUGE__"]
    if not optional:
        values.append(None)
    if kind == "int":
        values += [2.5, 1 << 64, 1e300, "2.5"]
    return values


def model_field(rng, blob, parts):
    meta = json.loads(json.dumps(parts.meta))
    name = rng.choice(list(meta["model"]) + ["unknown", "remove"])
    if name == "unknown":
        meta["model"][rng.choice(["layers", "hidden", "Cell", ""])] = 2
        note = "unknown model key"
    elif name == "remove":  # an error, unless the value was the default anyway (then: identical)
        key = rng.choice(list(meta["model"]))
        same = meta["model"].pop(key) == getattr(ModelConfig(), key)
        signed = rng.random() < 0.8
        return Mutation(
            compose(parts, signed=signed, meta_text=json.dumps(meta)),
            f"model.{key} removed",
            "any" if same and signed else "error",
        )
    else:
        kind = {"cell": "str", "dropout": "float", "forget_bias": "float"}.get(name, "int")
        pool = _invalid_values(kind, False)
        if kind == "int":  # valid integers that do not match the tensors, and absurd sizes
            pool += [
                meta["model"][name] + 1,
                max(meta["model"][name] - 1, 1) if meta["model"][name] > 2 else 7,
                0,
                10**12,
                1e12,
                1 << 40,
            ]
        if name == "cell":
            pool += [c for c in ("lstm", "gru", "rnn") if c != meta["model"]["cell"]] + ["LSTM", "transformer"]
        if name == "dropout":
            pool += [1.0, 1.5, -0.1]
        if name == "forget_bias":  # init only: any value in [-100, 100] is valid (and changes nothing), so only those outside
            pool += [100.5, -1e9]
        meta["model"][name] = rng.choice(pool)
        note = f"model.{name} = {str(meta['model'][name])[:30]}"
    signed = rng.random() < 0.8
    text = json.dumps(meta, ensure_ascii=False).replace('"__HUGE__"', HUGE_DIGITS)
    return Mutation(compose(parts, signed=signed, meta_text=text), note + ("" if signed else " (unsigned)"), "error")


TRAIN_KINDS = {f.name: (str(f.type).split(" ")[0], "None" in str(f.type)) for f in dataclasses.fields(TrainConfig)}


def train_field(rng, blob, parts):
    meta = json.loads(json.dumps(parts.meta))
    name = rng.choice(list(TRAIN_KINDS))
    kind, optional = TRAIN_KINDS[name]
    meta["train"][name] = rng.choice(_invalid_values(kind, optional))
    signed = rng.random() < 0.8
    text = json.dumps(meta, ensure_ascii=False).replace('"__HUGE__"', HUGE_DIGITS)
    return Mutation(compose(parts, signed=signed, meta_text=text), f"train.{name} = {str(meta['train'][name])[:30]}", "error")


def vocab_record(rng, blob, parts):
    meta = json.loads(json.dumps(parts.meta))
    v = meta["vocab"]
    expect = "error"
    if v["kind"] == "char":
        chars = v["chars"]
        what = rng.choice(
            [
                "shorter",
                "longer",
                "unsorted",
                "duplicate",
                "surrogate",
                "not-str",
                "missing",
                "kind",
                "spm-kind",
                "bytes-kind",
                "same-length-other",
                "record",
                "vocab_size",
            ]
        )
        if what == "shorter":
            v["chars"] = chars[:-1]
        elif what == "longer":
            v["chars"] = chars + "\uffff"
        elif what == "unsorted":
            v["chars"] = chars[1] + chars[0] + chars[2:]
        elif what == "duplicate":
            v["chars"] = chars[:-1] + chars[-2]
        elif what == "surrogate":
            v["chars"] = chars[:-1] + "\ud800"
        elif what == "not-str":
            v["chars"] = rng.choice([list(chars), None, 3, {"a": 1}])
        elif what == "missing":
            del v["chars"]
        elif what == "kind":
            v["kind"] = rng.choice(["Char", "", None, 3, "utf8"])
        elif what == "spm-kind":
            v["kind"] = "spm"
        elif what == "bytes-kind":
            v["kind"] = "bytes"
            v["bytes"] = rng.choice([[300] * len(chars), list(range(len(chars)))[::-1], [True] * len(chars), None, "abc"])
        elif what == "same-length-other":  # a valid vocabulary, another one: only the checksum can tell
            v["chars"] = "".join(sorted(set(chr(ord(c) + 1) for c in chars)))
            expect = "other"
        elif what == "record":
            meta["vocab"] = rng.choice([None, [], "abc", 3])
        else:
            meta["model"]["vocab_size"] = len(chars) + rng.choice([-1, 1, 100])
    else:
        what = rng.choice(["sha", "tokenizer", "vocab_size", "no-sha", "kind", "byte_pieces"])
        if what == "sha":
            v["sha256"] = "0" * 64
        elif what == "no-sha":
            del v["sha256"]
        elif what == "tokenizer":
            v["tokenizer"] = rng.choice(["sentencepiece", None, 3, ""])
        elif what == "vocab_size":
            v["vocab_size"] = v["vocab_size"] + 1
        elif what == "kind":
            v["kind"] = "char"
        else:
            v["sha256"] = rng.choice([3, None, "xyz", "A" * 64])
    signed = rng.random() < 0.8
    if not signed and what == "same-length-other":
        expect = "error"
    return Mutation(
        compose(dataclasses.replace(parts, meta=meta), signed=signed),
        f"vocab: {what}" + ("" if signed else " (unsigned)"),
        expect if signed else "error",
    )


def tokenizer_tensor(rng, blob, parts):
    tensors = dict(parts.tensors)
    if "tokenizer.spm" in tensors:
        what = rng.choice(["remove", "corrupt", "dtype", "shape", "empty"])
        dtype, shape, raw = tensors["tokenizer.spm"]
        if what == "remove":
            del tensors["tokenizer.spm"]
        elif what == "corrupt":
            i = rng.randrange(len(raw))
            tensors["tokenizer.spm"] = [dtype, shape, raw[:i] + bytes([raw[i] ^ 0x5A]) + raw[i + 1 :]]
        elif what == "dtype":
            tensors["tokenizer.spm"] = ["I8", shape, raw]
        elif what == "shape":
            tensors["tokenizer.spm"] = [dtype, [1, len(raw)], raw]
        else:
            tensors["tokenizer.spm"] = [dtype, [0], b""]
    else:
        what = rng.choice(["random", "empty"])
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) if what == "random" else b""
        tensors["tokenizer.spm"] = ["U8", [len(raw)], raw]
        what = f"added to a char model ({what})"
    signed = rng.random() < 0.8
    return Mutation(compose(dataclasses.replace(parts, tensors=tensors), signed=signed), f"tokenizer tensor: {what}", "error")


def tensor_names(rng, blob, parts):
    tensors = dict(parts.tensors)
    name = rng.choice(sorted(tensors))
    what = rng.choice(["rename", "drop", "extra", "prefix", "layer"])
    if what == "rename":
        tensors[name + rng.choice(["x", ".", "_1", " "])] = tensors.pop(name)
    elif what == "drop":
        del tensors[name]
    elif what == "extra":
        tensors[rng.choice(["model.extra", "extra", "model.rnn.weight_ih_l9", "train_state.extra", "__x__"])] = [
            "F32",
            [1],
            b"\0\0\0\0",
        ]
    elif what == "prefix":
        tensors[name.replace("model.", "modl.", 1).replace("train_state.", "train-state.", 1)] = tensors.pop(name)
    else:
        tensors[name.replace("_l0", "_l7")] = tensors.pop(name)
    if len(tensors) == len(parts.tensors) and set(tensors) == set(parts.tensors):
        del tensors[name]  # the rename changed nothing (no "_l0" in the name): drop it instead
        what += "->drop"
    signed = rng.random() < 0.8
    return Mutation(compose(dataclasses.replace(parts, tensors=tensors), signed=signed), f"tensor {name}: {what}", "error")


def dtype_shape(rng, blob, parts):
    tensors = dict(parts.tensors)
    name = rng.choice(sorted(k for k, v in tensors.items() if v[0] == "F32"))
    dtype, shape, raw = tensors[name]
    what = rng.choice(["F64", "F16", "BF16", "I32", "transpose", "flatten", "extra-dim", "scalar"])
    signed = rng.random() < 0.8
    if ".hidden." in name and what in ("F16", "BF16") and signed:
        # A carried state in 16 bits is what autocast can leave: a valid file, its state rounded.
        tensors[name] = [what, shape, reencode(raw, "F32", what)]
        return Mutation(compose(dataclasses.replace(parts, tensors=tensors)), f"tensor {name}: {what}", "other")
    if what in ("F64", "F16", "BF16", "I32"):
        tensors[name] = [what, shape, reencode(raw, "F32", what)]
    elif what == "transpose" and len(shape) == 2 and shape[0] != shape[1]:
        tensors[name] = [dtype, shape[::-1], raw]
    elif what == "flatten" and len(shape) != 1:
        tensors[name] = [dtype, [math.prod(shape)], raw]
    elif what == "scalar" and math.prod(shape) != 1:
        tensors[name] = [dtype, [], raw[:4]]
    else:
        tensors[name] = [dtype, [1] + shape, raw]
        what = "extra-dim"
    return Mutation(compose(dataclasses.replace(parts, tensors=tensors), signed=signed), f"tensor {name}: {what}", "error")


def nonfinite(rng, blob, parts):
    tensors = dict(parts.tensors)
    name = rng.choice(sorted(k for k in tensors if k.startswith("model.")) + ["model.head.bias"] * 3)
    dtype, shape, raw = tensors[name]
    values = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    value = rng.choice([NAN, INF, -INF, 3e38, -3e38, 1e35])
    values[rng.randrange(values.numel())] = value
    tensors[name] = [dtype, shape, values.numpy().tobytes()]
    signed = rng.random() < 0.7
    return Mutation(
        compose(dataclasses.replace(parts, tensors=tensors), signed=signed),
        f"{name} holds {value}" + ("" if signed else " (unsigned)"),
        "error",
    )


def weight_change(rng, blob, parts):
    """A finite weight changed and the checksum left as it was: only the checksum can catch it."""
    tensors = dict(parts.tensors)
    name = rng.choice(sorted(k for k in tensors if k.startswith("model.")))
    dtype, shape, raw = tensors[name]
    values = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    values[rng.randrange(values.numel())] += rng.choice([1e-6, 0.5, -2.0, 10.0])
    tensors[name] = [dtype, shape, values.numpy().tobytes()]
    return Mutation(compose(dataclasses.replace(parts, tensors=tensors), signed=False), f"{name} changed (unsigned)", "error")


def state_tensors(rng, blob, parts):
    tensors = dict(parts.tensors)
    if not any(k.startswith("train_state.") for k in tensors):
        tensors["train_state.rng.torch"] = ["U8", [5056], bytes(5056)]
        meta = {k: v for k, v in parts.meta.items() if k != "train_state"}
        return Mutation(compose(Parts(parts.metadata, meta, tensors)), "train-state tensors without a record", "error")
    moments = sorted(k for k in tensors if ".exp_avg" in k)
    what = rng.choice(
        [
            "unknown",
            "index",
            "slot-missing",
            "moment-shape",
            "step-shape",
            "step-dtype",
            "rng-size",
            "rng-dtype",
            "hidden-shape",
            "hidden-count",
            "hidden-rows0",
            "cuda-gap",
            "noncanonical",
            "negative-sq",
            "nan-moment",
        ]
    )
    if what == "unknown":
        tensors["train_state." + rng.choice(["optim.0.max_exp_avg_sq", "lr", "rng.numpy", "hidden.x", "optim.x.step"])] = [
            "F32",
            [1],
            bytes(4),
        ]
    elif what == "index":
        tensors["train_state.optim.999.step"] = ["F32", [], bytes(4)]
    elif what == "slot-missing":
        del tensors[rng.choice(moments)]
    elif what == "moment-shape":
        k = rng.choice(moments)
        d, s, raw = tensors[k]
        tensors[k] = [d, [len(raw) // 4], raw] if len(s) != 1 else [d, [1, s[0]], raw]
    elif what == "step-shape":
        k = rng.choice(sorted(k for k in tensors if k.endswith(".step")))
        tensors[k] = ["F32", [1], tensors[k][2]]
    elif what == "step-dtype":
        k = rng.choice(sorted(k for k in tensors if k.endswith(".step")))
        tensors[k] = ["I32", [], reencode(tensors[k][2], "F32", "I32")]
    elif what == "rng-size":
        n = rng.choice([0, 16, 5055, 5057, 10000])
        tensors["train_state.rng.torch"] = ["U8", [n], bytes(n)]
    elif what == "rng-dtype":
        tensors["train_state.rng.torch"] = ["I8", [5056], tensors["train_state.rng.torch"][2]]
    elif what == "hidden-shape":
        d, s, raw = tensors["train_state.hidden.0"]
        tensors["train_state.hidden.0"] = [d, [s[1], s[0], s[2]], raw] if s[0] != s[1] else [d, [s[0] * s[1], s[2]], raw]
    elif what == "hidden-count":
        d, s, raw = tensors["train_state.hidden.0"]
        if "train_state.hidden.1" in tensors:  # an LSTM: h and c
            if rng.random() < 0.5:
                del tensors["train_state.hidden.1"]
            else:
                tensors["train_state.hidden.2"] = [d, s, raw]
        else:
            tensors[rng.choice(["train_state.hidden.1", "train_state.hidden.2"])] = [d, s, raw]
    elif what == "hidden-rows0":
        for k in [k for k in tensors if ".hidden." in k]:
            d, s, raw = tensors[k]
            tensors[k] = [d, [s[0], 0, s[2]], b""]
    elif what == "cuda-gap":
        tensors["train_state.rng.cuda.1"] = ["U8", [16], bytes(16)]
    elif what == "noncanonical":
        k = rng.choice(moments)
        tensors[k.replace("optim.", "optim.0", 1)] = tensors.pop(k)
    elif what == "negative-sq":
        k = rng.choice([m for m in moments if m.endswith("_sq")])
        d, s, raw = tensors[k]
        v = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
        v[0] = -1.0
        tensors[k] = [d, s, v.numpy().tobytes()]
    else:
        k = rng.choice(moments)
        d, s, raw = tensors[k]
        v = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
        v[0] = NAN
        tensors[k] = [d, s, v.numpy().tobytes()]
    signed = rng.random() < 0.8
    return Mutation(compose(dataclasses.replace(parts, tensors=tensors), signed=signed), f"train state: {what}", "error")


STATE_FIELDS = ("step", "epoch", "window", "tokens", "elapsed", "best_val", "best_step")


def state_record(rng, blob, parts):
    meta = json.loads(json.dumps(parts.meta))
    what = rng.choice(
        ["field", "field", "field", "unknown", "remove-record"]
        + (["remove-tensors"] if "train_state.rng.torch" in parts.tensors else [])
    )
    tensors = parts.tensors
    if what == "field":
        name = rng.choice(STATE_FIELDS)
        pool = [None, "x", True, [], {}, NAN, -INF, -1, -0.5, "__HUGE__"]
        pool += [1.5, 1 << 70, INF] if name not in ("elapsed", "best_val") else [INF] if name == "elapsed" else []
        meta["train_state"][name] = rng.choice(pool)
        what = f"train_state.{name} = {meta['train_state'][name]}"
    elif what == "unknown":  # read by sample and eval (they ignore it); refused by --resume
        meta["train_state"][rng.choice(["lr", "Step", "rank", ""])] = 1
        signed = rng.random() < 0.8
        return Mutation(
            compose(parts, signed=signed, meta_text=json.dumps(meta)),
            "train-state record: unknown field",
            "any" if signed else "error",
        )
    elif what == "remove-record":  # without tensors (a best file) it is still a valid file
        del meta["train_state"]
        expect = "error" if "train_state.rng.torch" in tensors else "any"
        signed = rng.random() < 0.8
        return Mutation(
            compose(parts, signed=signed, meta_text=json.dumps(meta)), "train-state record removed", expect if signed else "error"
        )
    else:  # a best file, as charlm writes it: loads (identical weights); --resume refuses it
        tensors = {k: v for k, v in tensors.items() if not k.startswith("train_state.")}
        signed = rng.random() < 0.8
        return Mutation(
            compose(dataclasses.replace(parts, tensors=tensors), signed=signed),
            "train-state tensors removed",
            "any" if signed else "error",
        )
    signed = rng.random() < 0.8
    text = json.dumps(meta, ensure_ascii=False).replace('"__HUGE__"', HUGE_DIGITS)
    return Mutation(
        compose(dataclasses.replace(parts, tensors=tensors), signed=signed, meta_text=text),
        f"train-state record: {what}",
        "error",
    )


def format_fields(rng, blob, parts):
    metadata = dict(parts.metadata)
    what = rng.choice(["format", "version", "no-version", "no-meta", "no-format"])
    if what == "format":
        metadata["format"] = rng.choice(["charlm", "charlm-checkpoint ", "", "CHARLM-CHECKPOINT"])
    elif what == "version":
        metadata["format_version"] = rng.choice(["2", "0", "-1", "abc", "1e5", " 1", "1.0", "", "٣", HUGE_DIGITS, "99999999999"])
    elif what == "no-version":
        del metadata["format_version"]
    elif what == "no-meta":
        del metadata["meta"]
        return Mutation(
            join(json.dumps({"__metadata__": metadata, **_entries(parts)}).encode(), _data(parts)), "meta removed", "error"
        )
    else:
        del metadata["format"]
    return Mutation(
        compose(dataclasses.replace(parts, metadata=metadata)),
        f"metadata {what}: {str(metadata.get('format_version', ''))[:12]}",
        "error",
    )


def _entries(parts: Parts) -> dict:
    out, offset = {}, 0
    for name in sorted(parts.tensors):
        dtype, shape, raw = parts.tensors[name]
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    return out


def _data(parts: Parts) -> bytes:
    return b"".join(parts.tensors[k][2] for k in sorted(parts.tensors))


def checksum_fields(rng, blob, parts):
    n, text, data = split(blob)
    header = json.loads(text)
    md = header["__metadata__"]
    what = rng.choice(["remove-one", "alter", "upper", "not-hex", "swap", "remove-both"])
    key = rng.choice(["weights_sha256", "record_sha256"])
    expect = "error"
    if what == "remove-one":
        del md[key]
    elif what == "alter":
        i = rng.randrange(64)
        md[key] = md[key][:i] + ("0" if md[key][i] != "0" else "1") + md[key][i + 1 :]
    elif what == "upper":
        md[key] = md[key].upper() if any(c in "abcdef" for c in md[key]) else "F" + md[key][1:]
    elif what == "not-hex":
        md[key] = rng.choice(["", "xyz", "0" * 63, md[key] + "0"])
    elif what == "swap":
        md["weights_sha256"], md["record_sha256"] = md["record_sha256"], md["weights_sha256"]
    else:  # a file as charlm wrote it before checksums: accepted, unchecked
        del md["weights_sha256"], md["record_sha256"]
        expect = "success"
    return Mutation(join(json.dumps(header).encode(), data), f"checksum {what} ({key})", expect)


def valid_variants(rng, blob, parts):
    """Files that say the same thing another way: each must load, and behave exactly as the original."""
    what = rng.choice(["reorder-data", "indent", "key-order", "no-padding", "unsigned-identical"])
    if what == "reorder-data":
        order = sorted(parts.tensors)
        rng.shuffle(order)
        data = compose(parts, order=order)
    elif what == "indent":
        data = compose(parts, indent=rng.choice([1, 2, 4]))
    elif what == "key-order":
        _, text, d = split(blob)
        header = json.loads(text)
        keys = list(header)
        rng.shuffle(keys)
        data = join(json.dumps({k: header[k] for k in keys}).encode(), d)
    elif what == "no-padding":
        _, text, d = split(blob)
        data = join(text.rstrip(b" "), d, pad=False)
    else:
        data = compose(parts, signed=True)
    return Mutation(data, f"valid variant: {what}", "success")


FAMILIES: list[tuple[str, Callable]] = [
    ("flip-header", flip_header),
    ("flip-data", flip_data),
    ("flip-meta", flip_meta),
    ("flip-length", flip_length),
    ("truncate", truncate),
    ("header-length", header_length),
    ("trailing", trailing),
    ("foreign", foreign),
    ("header-json", header_json),
    ("entry", entry_structure),
    ("offsets", offsets_layout),
    ("meta-json", meta_text),
    ("sections", sections),
    ("model-config", model_field),
    ("train-config", train_field),
    ("vocab", vocab_record),
    ("tokenizer", tokenizer_tensor),
    ("names", tensor_names),
    ("dtype-shape", dtype_shape),
    ("nonfinite", nonfinite),
    ("weight-change", weight_change),
    ("state-tensors", state_tensors),
    ("state-record", state_record),
    ("format", format_fields),
    ("checksum", checksum_fields),
    ("valid", valid_variants),
]


def make_case(bases: dict[str, bytes], seed: int, index: int) -> Case:
    """Case `index` of the run seeded `seed`: the families in turn, a base and a mutation drawn at random."""
    rng = random.Random(seed * 1_000_003 + index)
    family, fn = FAMILIES[index % len(FAMILIES)]
    base = rng.choice(sorted(bases))
    blob = bases[base]
    m = fn(rng, blob, decompose(blob))
    return Case(index=index, family=family, note=m.note, data=m.data, expect=m.expect, base=base)


# -- the good files ---------------------------------------------------------------------------------
# (their text: conftest.make_text, the suite's tiny corpus)


@dataclass
class Base:
    path: Path
    data_dir: Path  # the prepared dir it was trained on (for --resume)
    text: Path  # a text in its vocabulary (for eval --text)
    blob: bytes = b""
    ckpt: checkpoint.Checkpoint | None = None
    expected: dict = field(default_factory=dict)  # command -> what a success must print or produce


BASE_SPECS = {  # name: (cell, tokenizer, file)
    "lstm-last": ("lstm", "char", "last"),
    "gru-best": ("gru", "char", "best"),
    "rnn-last": ("rnn", "char", "last"),
    "spm-lstm-last": ("lstm", "bpe", "last"),
}


def make_bases(root: Path, names: tuple[str, ...] = tuple(BASE_SPECS)) -> dict[str, Base]:
    """Tiny trained checkpoints (a few seconds in all): the good files every case starts from."""
    from charlm.tokenizers.spm import TokenizerSpec

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    src = root / "text.txt"
    src.write_text(make_text(6000))
    sample_text = root / "sample.txt"
    sample_text.write_text(make_text(300, seed=1))
    prepared = {}
    bases = {}
    for name in names:
        cell, tok, which = BASE_SPECS[name]
        if tok not in prepared:
            prepared[tok] = root / f"prepared-{tok}"
            prep.prepare([src], prepared[tok], tokenizer=None if tok == "char" else TokenizerSpec(tok, 60))
        data = PreparedData(prepared[tok])
        model = ModelConfig(cell=cell, num_layers=2, rnn_size=8, embed_size=4)
        train = TrainConfig(batch_size=2, seq_length=8, max_steps=3, eval_every=3, log_every=3, device="cpu", seed=0)
        out = root / f"run-{name}"
        Trainer(model, train, data, out).run()
        path = root / f"{name}.safetensors"
        path.write_bytes((out / f"{which}.safetensors").read_bytes())
        bases[name] = Base(path=path, data_dir=prepared[tok], text=sample_text, blob=path.read_bytes())
    return bases


# -- the oracle -----------------------------------------------------------------------------------


class Hang(Exception):
    pass


@dataclass
class Outcome:
    kind: str  # "clean" (a clean error everywhere), "success" (identical to the original), "other" (valid, different), "failure"
    detail: str = ""  # for a failure: what went wrong (the failure class first)
    commands: int = 0


class Runner:
    """Runs cases against the bases, in one process, with the CLI through CliRunner."""

    def __init__(self, root: Path, bases: dict[str, Base], commands: tuple[str, ...] = ("info", "sample", "eval", "resume")):
        self.root, self.bases, self.commands = root, bases, commands
        self.cli = CliRunner()
        self.command = typer.main.get_command(app)
        self.case_path = root / "case.safetensors"
        self.resume_out = root / "resume-out"
        for base in bases.values():
            base.ckpt = checkpoint.load(base.path)
            for command in commands:
                result = self._command(command, base.path, base)
                if result.exit_code not in (0, 1) or (result.exit_code == 1 and command != "resume"):
                    raise RuntimeError(f"{command} fails on the good file {base.path}: {result.output}")
                base.expected[command] = self._product(command, result)

    def _args(self, command: str, path: Path, base: Base) -> list[str]:
        if command == "info":
            return ["info", str(path)]
        if command == "sample":
            return ["sample", str(path), "--length", "20", "--seed", "1"]
        if command == "eval":
            return ["eval", str(path), "--text", str(base.text), "--json"]
        step = base.ckpt.meta.get("train_state", {}).get("step", 3)
        return [
            "train",
            str(base.data_dir),
            "--resume",
            str(path),
            "--out",
            str(self.resume_out),
            "--max-steps",
            str(step + 1),
            "--log-every",
            "1",
        ]

    def _command(self, command: str, path: Path, base: Base):
        shutil.rmtree(self.resume_out, ignore_errors=True)
        # Typer rebuilds the click command from the app's signatures on every invoke (about 0.1 s):
        # hand it the one built once instead, for the length of this call.
        original = typer.testing._get_command
        typer.testing._get_command = lambda _app: self.command
        try:
            return self.cli.invoke(app, self._args(command, path, base))
        finally:
            typer.testing._get_command = original

    def _product(self, command: str, result):
        """What a success leaves to compare: the text printed, or the weights after resuming."""
        if result.exit_code != 0:
            return ("error", _first_line(result.stderr))
        if command == "resume":
            last = self.resume_out / "last.safetensors"
            checkpoint.load(last)  # what resuming wrote must load too
            return checkpoint.read_header(last)["__metadata__"]["weights_sha256"], checkpoint.read_meta(last)["train_state"][
                "step"
            ]
        if command == "info":
            return None
        return result.stdout

    def run(self, case: Case, with_cli: bool) -> Outcome:
        base = self.bases[case.base]
        self.case_path.write_bytes(case.data)
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(CASE_SECONDS)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome = self._judge(case, base, with_cli)
            if caught and outcome.kind != "failure":
                w = caught[0]
                outcome = Outcome("failure", f"Warning: {w.category.__name__}: {str(w.message).splitlines()[0][:120]}")
        except Hang:
            outcome = Outcome("failure", f"Hang: over {CASE_SECONDS} s")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        return outcome

    def _judge(self, case: Case, base: Base, with_cli: bool) -> Outcome:
        try:
            ckpt = checkpoint.load(self.case_path)
        except CharlmError as e:
            loaded, message = None, str(e)
            if "\n" in message:
                return Outcome("failure", f"MultilineError: {message[:200]!r}")
        except Hang:
            raise
        except BaseException as e:  # noqa: BLE001 - any other exception is what the fuzzer looks for
            return Outcome("failure", f"{type(e).__name__} in load: {_first_line(str(e))[:200]} at {_where(e)}")
        else:
            loaded = ckpt
            same = _same_model(ckpt, base.ckpt)
            if same and case.expect != "other":
                return Outcome("failure", f"SilentGarbage: load succeeded but {same}")
        if loaded is None and case.expect == "success":
            return Outcome("failure", f"RefusedValid: a valid file was refused: {message[:200]}")
        if loaded is not None and case.expect == "error":
            return Outcome("failure", "AcceptedInvalid: an invalid file loaded")
        if loaded is None and case.expect == "other":
            return Outcome("failure", f"RefusedValid: a valid (different) file was refused: {message[:200]}")
        kind = "clean" if loaded is None else "other" if case.expect == "other" else "success"
        commands = 0
        if with_cli:
            for command in self.commands:
                result = self._command(command, self.case_path, base)
                commands += 1
                problem = self._check_cli(command, result, base, loaded is not None, compare=case.expect != "other")
                if problem:
                    return Outcome("failure", f"{problem} [{command}]", commands)
        return Outcome(kind, "", commands)

    def _check_cli(self, command: str, result, base: Base, loaded: bool, compare: bool = True) -> str | None:
        if isinstance(result.exception, Hang):
            raise Hang()
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            e = result.exception
            return f"{type(e).__name__}: {_first_line(str(e))[:160]} at {_where(e)}"
        if "Traceback" in result.output:
            return "Traceback in the output"
        if result.exit_code == 1:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            if len(lines) != 1 or not lines[0].startswith("error: "):
                return f"UncleanError: stderr {result.stderr[-300:]!r}"
            return None  # a clean refusal is always an acceptable answer
        if result.exit_code != 0:
            return f"ExitCode{result.exit_code}: {result.output[-200:]!r}"
        if not loaded:
            return "CliSucceededWhereLoadFailed"
        produced = self._product(command, result)
        if not compare:
            return None
        if command == "resume":
            return None if _same_resume(produced, base.expected[command]) else "SilentGarbage: resuming gives other weights"
        if produced != base.expected[command]:
            return f"SilentGarbage: {command} prints {str(produced)[:80]!r}, the original {str(base.expected[command])[:80]!r}"
        return None


def _on_alarm(signum, frame):
    raise Hang()


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/charlm/" in f.filename] or frames
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"


def _same_model(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> str | None:
    """None when a holds exactly b's weights and vocabulary; else what differs."""
    wa, wb = a.model_state(), b.model_state()
    if set(wa) != set(wb):
        return "its tensor names differ"
    for k in wa:
        if wa[k].dtype != wb[k].dtype or wa[k].shape != wb[k].shape or not torch.equal(wa[k], wb[k]):
            return f"weight {k} differs"
    if a.vocab != b.vocab:
        return "its vocabulary differs"
    return None


def _same_resume(a, b) -> bool:
    return a == b  # (weights sha256, step) of the file resuming wrote


@dataclass
class Totals:
    cases: int = 0
    clean: int = 0
    success: int = 0
    other: int = 0  # valid files that differ from their base (a re-signed vocabulary, a 16-bit carried state)
    commands: int = 0
    failures: dict = field(default_factory=dict)  # failure class -> count
    examples: list = field(default_factory=list)  # (index, family, base, note, detail)
    families: dict = field(default_factory=dict)  # family -> [clean, success, failure]

    def add(self, case: Case, outcome: Outcome) -> None:
        self.cases += 1
        self.commands += outcome.commands
        row = self.families.setdefault(case.family, [0, 0, 0])
        if outcome.kind == "clean":
            self.clean += 1
            row[0] += 1
        elif outcome.kind in ("success", "other"):
            self.success += outcome.kind == "success"
            self.other += outcome.kind == "other"
            row[1] += 1
        else:
            cls = outcome.detail.split(":")[0].split(" ")[0]
            self.failures[cls] = self.failures.get(cls, 0) + 1
            row[2] += 1
            if len(self.examples) < 50:
                self.examples.append((case.index, case.family, case.base, case.note[:120], outcome.detail))


def run_cases(
    runner: Runner, seed: int, count: int, cli_every: int = 1, progress: Callable[[int], None] | None = None
) -> tuple[Totals, float]:
    """Cases 0..count-1 of `seed`; every cli_every-th also through the CLI. Returns the totals and the wall time."""
    totals = Totals()
    blobs = {name: b.blob for name, b in runner.bases.items()}
    start = time.perf_counter()
    for i in range(count):
        case = make_case(blobs, seed, i)
        totals.add(case, runner.run(case, with_cli=cli_every > 0 and i % cli_every == 0))
        if progress:
            progress(i)
    return totals, time.perf_counter() - start
