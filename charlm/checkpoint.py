"""The checkpoint format: one .safetensors file, weights + JSON metadata (+ training state).

See docs/checkpoint-format.md. Loading never unpickles: safetensors holds raw tensors and a JSON
header only, and anything else (a torch.save pickle renamed .safetensors, say) is refused.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from charlm import CharlmError
from charlm.config import ModelConfig
from charlm.model import CharRNN
from charlm.vocab import load_vocab

FORMAT = "charlm-checkpoint"
VERSION = 1
MODEL_PREFIX = "model."
STATE_PREFIX = "train_state."
TOKENIZER_TENSOR = "tokenizer.spm"  # a SentencePiece vocabulary's serialized model, as uint8
MAX_HEADER = 100 << 20


@dataclass
class Checkpoint:
    path: Path
    meta: dict  # model, train, vocab, metrics, provenance, train_state (JSON scalars)
    tensors: dict[str, torch.Tensor]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.meta["model"])

    @property
    def vocab(self):
        """The vocabulary, from this file alone: a character list in the meta, or the SentencePiece model tensor."""
        blob = self.tensors.get(TOKENIZER_TENSOR)
        model_bytes = None if blob is None else blob.numpy().tobytes()
        return load_vocab(self.meta["vocab"], model_bytes, where=str(self.path))

    @property
    def has_train_state(self) -> bool:
        return any(k.startswith(STATE_PREFIX) for k in self.tensors) or "train_state" in self.meta

    def model_state(self) -> dict[str, torch.Tensor]:
        n = len(MODEL_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(MODEL_PREFIX)}

    def train_tensors(self) -> dict[str, torch.Tensor]:
        n = len(STATE_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(STATE_PREFIX)}

    def build_model(self) -> CharRNN:
        """The trained network on CPU, in eval mode."""
        model = CharRNN(self.model_config)
        try:
            model.load_state_dict(self.model_state())
        except RuntimeError as e:
            raise CharlmError(f"{self.path}: weights do not match the recorded model config ({str(e).splitlines()[0]})") from None
        return model.eval()


def save(path: str | Path, model: CharRNN, meta: dict, train_tensors: dict[str, torch.Tensor] | None = None,
         vocab=None) -> Path:
    """Write atomically: temp file in the same dir, fsync, rename. The previous file survives any crash.

    A SentencePiece vocabulary's serialized model is stored as the uint8 tensor TOKENIZER_TENSOR.
    """
    path = Path(path)
    tensors = {MODEL_PREFIX + k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    model_bytes = getattr(vocab, "model_bytes", None)
    if model_bytes is not None:
        tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8)
    for k, v in (train_tensors or {}).items():
        tensors[STATE_PREFIX + k] = v.detach().to("cpu", copy=True).contiguous()
    header = {"format": FORMAT, "format_version": str(VERSION), "meta": json.dumps(meta, ensure_ascii=False)}
    blob = st_save(tensors, metadata=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_header(path: str | Path) -> dict:
    """The safetensors JSON header of a charlm checkpoint, checked, without reading the tensors."""
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; pass a checkpoint file such as {path / 'best.safetensors'}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        # A header length whose low byte is 0x80 looks like a pickle's first byte; a safetensors
        # header (JSON) always opens with "{" at byte 8, a pickle or zip there is anything else.
        if (head[:2] == b"PK" or head[:1] == b"\x80") and head[8:9] != b"{":
            raise CharlmError(f"{path} is a pickle (torch.save) file, not a charlm checkpoint; charlm never unpickles files")
        if len(head) < 8:
            raise CharlmError(f"{path} is empty or truncated: not a charlm checkpoint")
        (n,) = struct.unpack("<Q", head[:8])
        f.seek(8)
        if n > min(size - 8, MAX_HEADER):
            raise CharlmError(f"{path} is not a safetensors file, or it is truncated")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CharlmError(f"{path} is not a safetensors file, or it is corrupt") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CharlmError(f"{path} is not a charlm checkpoint (no '{FORMAT}' format field)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CharlmError(f"{path} has an unreadable format version") from None
    if version > VERSION:
        raise CharlmError(f"{path} uses checkpoint format version {version}; this charlm reads up to {VERSION}: upgrade charlm")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        raise CharlmError(f"{path} is truncated ({size:,} bytes; the header promises more); use another checkpoint")
    return header


def read_meta(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint (config, vocabulary, provenance ...), without reading the tensors."""
    try:
        return json.loads(read_header(path)["__metadata__"]["meta"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CharlmError(f"{path} is corrupt (unreadable metadata); use another checkpoint") from None


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint onto the CPU, whatever device wrote it."""
    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = st_load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CharlmError(f"{path} is corrupt ({type(e).__name__}); use another checkpoint") from None
    return Checkpoint(path=path, meta=meta, tensors=tensors)
