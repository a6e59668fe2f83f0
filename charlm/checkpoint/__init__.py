"""The checkpoint format: one .safetensors file, weights + JSON metadata (+ training state).

See docs/checkpoint-format.md. This module owns the file's whole schema. It writes atomically, and
reads every file as a stranger's: the safetensors header (tensorfile.py: nothing is unpickled),
the metadata's types, the model config (config.py's checks, as for flags), every tensor's name,
dtype and shape against that config, the vocabulary against the output size and the tokenizer
tensor, the checksums and the finiteness of the weights, all before a model is built or a byte of
tensor data is allocated past what the header promises. It also packs and unpacks the training
state, checked against the model and optimizer before either is touched.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from charlm.checkpoint.checks import (
    check_entries,
    check_values,
    checked_meta,
    checked_vocab,
    model_tensor_shapes,  # noqa: F401 (API)
    verify_checksums,
)
from charlm.checkpoint.layout import (  # noqa: F401  (the format's names, part of this package's API)
    FORMAT,
    MODEL_PREFIX,
    PART_FILE,
    RECORD_SHA256,
    STATE_PREFIX,
    TOKENIZER_TENSOR,
    VERSION,
    WEIGHTS_SHA256,
    digest_order,
    utf8,
)
from charlm.checkpoint.tensorfile import (  # noqa: F401 (MAX_HEADER: API)
    MAX_HEADER,
    TensorFile,
    open_file,
    parse_json,
    tensor_digest,
)
from charlm.checkpoint.trainstate import gradient_second_moments, pack_train_state, unpack_train_state  # noqa: F401 (API)
from charlm.config import ModelConfig
from charlm.errors import CheckpointError
from charlm.model import CharRNN
from charlm.tokenizers.vocab import load_vocab


@dataclass
class Checkpoint:
    path: Path
    meta: dict  # model, train (as checked: every field, typed), vocab, metrics, provenance, train_state
    tensors: dict[str, torch.Tensor]
    checksum: str = "none"  # "verified": the file's checksums match; "none": written before checksums (unchecked)
    _vocab: Any = field(default=None, repr=False, compare=False)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.meta["model"])

    @property
    def vocab(self):
        """The vocabulary, from this file alone: a character list in the meta, or the SentencePiece model tensor."""
        if self._vocab is None:
            blob = self.tensors.get(TOKENIZER_TENSOR)
            model_bytes = None if blob is None else blob.numpy().tobytes()
            self._vocab = load_vocab(self.meta["vocab"], model_bytes, where=str(self.path))
        return self._vocab

    @property
    def has_train_state(self) -> bool:
        """Resumable: the training-state tensors are here (a best file keeps only the progress record)."""
        return STATE_PREFIX + "rng.torch" in self.tensors

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
            raise CheckpointError(
                f"{self.path}: weights do not match the recorded model config ({str(e).splitlines()[0]})"
            ) from None
        return model.eval()


def save(path: str | Path, model: CharRNN, meta: dict, train_tensors: dict[str, torch.Tensor] | None = None, vocab=None) -> Path:
    """Write atomically: temp file in the same dir, fsync, rename. The previous file survives any crash.

    A SentencePiece vocabulary's serialized model is stored as the uint8 tensor TOKENIZER_TENSOR.
    The file gets mode 0644 less the umask (best.safetensors is the file to share).
    """
    path = Path(path)
    tensors = {MODEL_PREFIX + k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    model_bytes = getattr(vocab, "model_bytes", None)
    if model_bytes is not None:
        tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8)
    for k, v in (train_tensors or {}).items():
        tensors[STATE_PREFIX + k] = v.detach().to("cpu", copy=True).contiguous()
    text = json.dumps(meta, ensure_ascii=False)
    if not text.isascii() and any("\ud800" <= c <= "\udfff" for c in text):
        text = json.dumps(meta)  # a path that is not UTF-8 (surrogate escapes): as JSON escapes, read back the same
    weights, others = digest_order(tensors)
    header = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "meta": text,
        WEIGHTS_SHA256: tensor_digest(tensors[k] for k in weights),
        RECORD_SHA256: tensor_digest((tensors[k] for k in others), prefix=utf8(text)),
    }
    blob = st_save(tensors, metadata=header)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as e:
        failed = CheckpointWriteError(_save_failed(path, e))
        failed.errno = e.errno
        raise failed from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


class CheckpointWriteError(CheckpointError, OSError):
    """A save that failed on the disk: one line with the file and the remedy (a CheckpointError), and
    an OSError with its errno, for callers that catch those."""


def _save_failed(path: Path, e: OSError) -> str:
    """A failed save as one line: which file, why, what to do, and that the previous file is untouched."""
    kept = "the previous checkpoint is intact" if path.exists() else "nothing was written"
    where = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device holding {where}; free space or choose another --out; {kept}"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where} ({e.strerror}); make its directory writable or choose another --out; {kept}"
    return f"cannot write {where} ({e.strerror or e}); {kept}"


def _umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_parts(directory: str | Path) -> list[Path]:
    """Delete the temporary `.NAME.XXXXXXXX.part` files that a save killed mid-write left behind; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        if PART_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:  # another process cleaned it up first
                continue
            removed.append(p)
    return removed


# -- reading: everything is checked before it is trusted --------------------------------------


def read_header(path: str | Path) -> dict:
    """The safetensors JSON header of a charlm checkpoint, checked, without reading the tensors."""
    f, _, _ = _open(path)
    f.close()
    header: dict[str, Any] = {
        name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]} for name, e in f.entries.items()
    }
    header["__metadata__"] = dict(f.metadata)
    return header


def weights_sha256(ckpt: Checkpoint) -> str:
    """The sha256 of a loaded checkpoint's weights, as its header records it (the same file: the same digest)."""
    weights, _ = digest_order(ckpt.tensors)
    return tensor_digest(ckpt.tensors[k] for k in weights)


def read_meta(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint (config, vocabulary, provenance ...), checked, without reading the tensors."""
    f, meta, _ = _open(path)
    f.close()
    return meta


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint onto the CPU, whatever device wrote it; a CharlmError says what is wrong with a bad one.

    Header and data come through one open file (tensorfile.TensorFile), so a concurrent atomic save
    of the same path is never mixed into what is read. A checksum mismatch in a file that was
    modified in place while it was read is read again once before it is called corrupt.
    """
    try:
        return _load(path)
    except CheckpointError as e:
        if not getattr(e, "changed_while_read", False):
            raise
        return _load(path)


def _load(path: str | Path) -> Checkpoint:
    f, meta, cfg = _open(path)
    f.read_data()  # its size is now known to be exactly what the config's tensors need (and the state, tokenizer)
    try:
        checksum = verify_checksums(f)
    except CheckpointError as e:
        e.changed_while_read = f.replaced()  # type: ignore[attr-defined]
        raise
    vocab = checked_vocab(f, meta, cfg)
    tensors = {name: f.tensor(name) for name in f.entries}
    check_values(f.path, tensors, cfg)
    return Checkpoint(path=f.path, meta=meta, tensors=tensors, checksum=checksum, _vocab=vocab)


def _open(path: str | Path) -> tuple[TensorFile, dict, ModelConfig]:
    """The header checked against the schema and the recorded config; no tensor data read yet."""
    f = open_file(path)
    try:
        meta = checked_meta(f)
        cfg = ModelConfig(**meta["model"])
        check_entries(f, meta, cfg)
    except BaseException:
        f.close()
        raise
    return f, meta, cfg
