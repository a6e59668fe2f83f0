"""The safetensors container, read strictly: the header is checked whole before any tensor exists.

safetensors' own loader raises its own error types on a malformed file, and only after it has
sized and allocated what the header says; here the header must be a JSON object of known dtypes,
shapes and offsets that tile the data section exactly (in bounds, in order, no overlap, no gap),
the data section is read only once the caller has checked the header against what it expects,
and each tensor is built from those checked offsets. Nothing is ever unpickled.

Layout (https://github.com/huggingface/safetensors): 8 bytes N (little-endian u64), N bytes of
JSON header, then the raw little-endian tensor data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import torch

from charlm.errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20
MAX_DIMS = 8
MAX_DIM = 1 << 48  # one dimension; the tensor must still fit in the file, this only keeps the arithmetic small
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class Entry:
    """One tensor's header record, checked."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the start of the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class TensorFile:
    """A safetensors file's checked header, and (once read) its data section.

    Header and data are read through one open file: a save that atomically replaces the path in
    between (a training run writing last.safetensors while `sample` reads it) cannot pair one
    file's header with another file's data; the reader keeps reading the file it opened.
    """

    path: Path
    header_size: int  # N
    file_size: int
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data: bytes | None = None
    identity: tuple[int, int, int] = (0, 0, 0)  # (device, inode, mtime_ns) of the file opened: did the path change since?
    handle: BinaryIO | None = field(default=None, repr=False)

    def read_data(self) -> None:
        """Read the data section (after the caller has checked the header against what it expects), then close the file."""
        if self.handle is None:
            raise CheckpointError(f"{self.path}: its data was read already")
        try:
            self.handle.seek(8 + self.header_size)
            data = self.handle.read()
        finally:
            self.close()
        if len(data) != self.file_size - 8 - self.header_size:
            raise CheckpointError(f"{self.path} changed while it was being read; try again")
        self.data = data

    def close(self) -> None:
        """Let go of the open file (reading the header only, or done)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def replaced(self) -> bool:
        """Whether the path now names another file, or the file changed, since it was opened."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino, st.st_mtime_ns) != self.identity

    def view(self, name: str) -> memoryview:
        """The raw bytes of one tensor (no copy)."""
        e = self.entries[name]
        return memoryview(self.data)[e.begin : e.end]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the file's bytes (aligned, writable, owned)."""
        e = self.entries[name]
        if e.numel == 0:
            return torch.empty(e.shape, dtype=DTYPES[e.dtype])
        buf = bytearray(self.view(name))
        out = torch.frombuffer(buf, dtype=DTYPES[e.dtype]).reshape(e.shape)
        return out if sys.byteorder == "little" else out.byteswap()  # pragma: no cover - big-endian hosts

    def digest(self, names: Iterable[str], prefix: bytes = b"") -> str:
        """sha256 of prefix + the data of the named tensors, in the order given."""
        h = hashlib.sha256(prefix)
        for name in names:
            h.update(self.view(name))
        return h.hexdigest()


def tensor_digest(tensors: Iterable[torch.Tensor], prefix: bytes = b"") -> str:
    """sha256 of prefix + the bytes each (CPU, contiguous) tensor occupies in a safetensors file."""
    h = hashlib.sha256(prefix)
    for t in tensors:
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {key[:60]!r} appears twice")
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, allow_nonfinite: bool = False) -> Any:
    """JSON that cannot crash the caller: duplicate keys, deep nesting and huge numbers become ValueError.

    NaN and Infinity (Python's json extension) are refused unless allow_nonfinite.
    """
    kwargs = {} if allow_nonfinite else {"parse_constant": _reject_constant}
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, **kwargs)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and ints past sys.get_int_max_str_digits
        if "integer string conversion" in str(e):
            raise ValueError("it holds a number of thousands of digits") from None
        raise ValueError(str(e).splitlines()[0][:200]) from None


def open_file(path: str | Path) -> TensorFile:
    """Read and check the header; the data section is left on disk (see TensorFile.read_data)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a checkpoint file such as {path / 'best.safetensors'}")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path} is not a regular file; pass a checkpoint file")
    f = open(path, "rb")  # kept open: the data is read through the same descriptor (TensorFile.read_data)
    try:
        st = os.fstat(f.fileno())
        size = st.st_size
        raw = _read_header(f, path, size)
        tf = _checked_file(path, raw, size)
    except BaseException:
        f.close()
        raise
    tf.identity, tf.handle = (st.st_dev, st.st_ino, st.st_mtime_ns), f
    return tf


def _read_header(f: BinaryIO, path: Path, size: int) -> bytes:
    """The header's bytes, after the checks that tell a safetensors file from a zip, a pickle or a stub."""
    head = f.read(9)
    if head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a zip archive (a torch.save file?), not a charlm checkpoint; charlm never unpickles files"
        )
    # A header length whose low byte is 0x80 looks like a pickle's first byte; a safetensors
    # header (JSON) always opens with "{" at byte 8, a pickle there is anything else.
    if head[:1] == b"\x80" and head[8:9] != b"{":
        raise CheckpointError(
            f"{path} is a pickle file (torch.save or pickle.dump), not a charlm checkpoint; charlm never unpickles files"
        )
    if len(head) < 8:
        raise CheckpointError(f"{path} is empty or truncated: not a charlm checkpoint")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > min(size - 8, MAX_HEADER):
        raise CheckpointError(f"{path} is not a safetensors file, or it is truncated")
    f.seek(8)
    return f.read(n)


def _checked_file(path: Path, raw: bytes, size: int) -> TensorFile:
    """The header parsed and checked whole: known dtypes, shapes, and offsets that tile the data exactly."""
    n = len(raw)
    try:
        header = parse_json(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError too
        raise CheckpointError(f"{path} is not a safetensors file, or it is corrupt (its header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} is corrupt: its __metadata__ is not a mapping of text to text")
    entries = {name: _entry(path, name, record) for name, record in header.items()}
    end = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != end:
            what = "overlaps another" if e.begin < end else "leaves a gap before it"
            raise CheckpointError(f"{path} is corrupt: the data of tensor {name[:80]!r} {what}")
        end = e.end
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated ({size:,} bytes; the header promises {8 + n + end:,}); use another checkpoint"
        )
    if 8 + n + end < size:
        raise CheckpointError(f"{path} is corrupt: {size - 8 - n - end:,} bytes follow the last tensor")
    return TensorFile(path=path, header_size=n, file_size=size, metadata=metadata, entries=entries)


def _entry(path: Path, name: str, record: Any) -> Entry:
    shown = repr(name[:80])
    if not isinstance(record, dict) or set(record) != ENTRY_KEYS:
        raise CheckpointError(f"{path} is corrupt: the header record of tensor {shown} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = record["dtype"], record["shape"], record["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path} is corrupt: tensor {shown} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise CheckpointError(f"{path} is corrupt: tensor {shown} has an invalid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise CheckpointError(f"{path} is corrupt: tensor {shown} has invalid data_offsets (two integers >= 0 expected)")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise CheckpointError(f"{path} is corrupt: the data_offsets of tensor {shown} do not match its dtype and shape")
    return Entry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)
