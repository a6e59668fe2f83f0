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

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from charlm import CharlmError, config
from charlm.config import ModelConfig
from charlm.model import CharRNN
from charlm.tensorfile import MAX_HEADER, TensorFile, open_file, parse_json, tensor_digest  # noqa: F401 (MAX_HEADER: API)
from charlm.vocab import load_vocab

FORMAT = "charlm-checkpoint"
VERSION = 1
MODEL_PREFIX = "model."
STATE_PREFIX = "train_state."
TOKENIZER_TENSOR = "tokenizer.spm"  # a SentencePiece vocabulary's serialized model, as uint8
# Checksums, in the header's __metadata__ (files written before them have neither, and are read unchecked):
WEIGHTS_SHA256 = "weights_sha256"  # sha256 of the data of the model.* tensors, in name order
RECORD_SHA256 = "record_sha256"  # sha256 of the `meta` text (UTF-8), then the data of every other tensor, in name order
REQUIRED_SECTIONS = ("model", "train", "vocab")
MAPPING_SECTIONS = ("model", "train", "vocab", "tokenizer", "metrics", "provenance", "train_state")
ADAM_SLOTS = ("exp_avg", "exp_avg_sq", "step")  # AdamW's per-parameter state
HIDDEN_DTYPES = ("F32", "BF16", "F16")  # the carried state keeps the dtype autocast gave it
CAN_BE_INFINITE = ("best_val",)  # training-state fields that are Infinity before the first evaluation
TRAIN_STATE_INTS = ("step", "epoch", "window", "tokens", "best_step")  # the other known fields are floats
PART_FILE = re.compile(r"\..+\.[A-Za-z0-9_]+\.part")  # what save's mkstemp names its temporary files


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
            raise CharlmError(f"{self.path}: weights do not match the recorded model config ({str(e).splitlines()[0]})") from None
        return model.eval()


def save(path: str | Path, model: CharRNN, meta: dict, train_tensors: dict[str, torch.Tensor] | None = None,
         vocab=None) -> Path:
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
    weights, others = _digest_order(tensors)
    header = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "meta": text,
        WEIGHTS_SHA256: tensor_digest(tensors[k] for k in weights),
        RECORD_SHA256: tensor_digest((tensors[k] for k in others), prefix=_utf8(text)),
    }
    blob = st_save(tensors, metadata=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


def _digest_order(names) -> tuple[list[str], list[str]]:
    """The tensor names each checksum covers, in the order it covers them: model.* ones, then all others."""
    names = sorted(names)
    return [k for k in names if k.startswith(MODEL_PREFIX)], [k for k in names if not k.startswith(MODEL_PREFIX)]


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate (JSON "\ud800") still hashes


# -- reading: everything is checked before it is trusted --------------------------------------

def read_header(path: str | Path) -> dict:
    """The safetensors JSON header of a charlm checkpoint, checked, without reading the tensors."""
    f, _, _ = _open(path)
    header: dict[str, Any] = {name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
                              for name, e in f.entries.items()}
    header["__metadata__"] = dict(f.metadata)
    return header


def read_meta(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint (config, vocabulary, provenance ...), checked, without reading the tensors."""
    return _open(path)[1]


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint onto the CPU, whatever device wrote it; a CharlmError says what is wrong with a bad one."""
    f, meta, cfg = _open(path)
    f.read_data()  # its size is now known to be exactly what the config's tensors need (and the state, tokenizer)
    checksum = _verify_checksums(f)
    vocab = _checked_vocab(f, meta, cfg)
    tensors = {name: f.tensor(name) for name in f.entries}
    _check_values(f.path, tensors, cfg)
    return Checkpoint(path=f.path, meta=meta, tensors=tensors, checksum=checksum, _vocab=vocab)


def _open(path: str | Path) -> tuple[TensorFile, dict, ModelConfig]:
    """The header checked against the schema and the recorded config; no tensor data read yet."""
    f = open_file(path)
    meta = _checked_meta(f)
    cfg = ModelConfig(**meta["model"])
    _check_entries(f, meta, cfg)
    return f, meta, cfg


def _checked_meta(f: TensorFile) -> dict:
    path, md = f.path, f.metadata
    if md.get("format") != FORMAT:
        raise CharlmError(f"{path} is not a charlm checkpoint (no '{FORMAT}' format field)")
    version = md.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,6}", version) or int(version) < 1:
        raise CharlmError(f"{path} has an unreadable format version")
    if int(version) > VERSION:
        raise CharlmError(f"{path} uses checkpoint format version {int(version)}; this charlm reads up to {VERSION}: upgrade charlm")
    try:
        meta = parse_json(md.get("meta", ""), allow_nonfinite=True)  # metrics may be NaN, best_val Infinity
    except ValueError as e:
        raise CharlmError(f"{path} is corrupt (unreadable metadata: {e}); use another checkpoint") from None
    if not isinstance(meta, dict):
        raise CharlmError(f"{path} is corrupt (its metadata is not a JSON object); use another checkpoint")
    for name in REQUIRED_SECTIONS:
        if name not in meta:
            raise CharlmError(f"{path} is corrupt: its metadata has no {name!r} section")
    for name in MAPPING_SECTIONS:
        if name in meta and not isinstance(meta[name], dict):
            raise CharlmError(f"{path} is corrupt: metadata section {name!r} is not a mapping")
    model_cfg, train_cfg = config.from_record(meta["model"], meta["train"], str(path))
    meta["model"], meta["train"] = dataclasses.asdict(model_cfg), dataclasses.asdict(train_cfg)
    for key, value in meta.get("metrics", {}).items():
        if isinstance(value, (dict, list)):
            raise CharlmError(f"{path} is corrupt: metrics.{key[:40]} is not a single value")
    provenance = meta.get("provenance", {})
    if not isinstance(provenance.get("data_dir", ""), str):
        raise CharlmError(f"{path} is corrupt: provenance.data_dir is not a path")
    for key, value in meta.get("train_state", {}).items():
        _check_state_field(path, key, value, key in TRAIN_STATE_INTS)
    return meta


def _check_state_field(path: Path, key: str, value: Any, integer: bool) -> float | int:
    """A progress field: an integer >= 0, or a finite float >= 0 (best_val: or Infinity, before the first evaluation)."""
    if integer:
        ok, need = type(value) is int and 0 <= value <= config.MAX_COUNT, "an integer >= 0"
    else:
        ok = type(value) in (int, float) and (math.isfinite(value) or (key in CAN_BE_INFINITE and value == math.inf)) and value >= 0
        need = "a finite number >= 0" + (" (or Infinity)" if key in CAN_BE_INFINITE else "")
    if not ok:
        raise CharlmError(f"{path}: training-state field {key[:40]} must be {need} (got {_short(value)})")
    return value if integer else float(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def model_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every CharRNN parameter's name and shape, in model.parameters() order, computed (nothing allocated).

    tests/test_checkpoint_trust.py checks it against CharRNN itself for every cell.
    """
    g, h, e, v = config.GATES[cfg.cell], cfg.rnn_size, cfg.embed_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, e)}
    for k in range(cfg.num_layers):
        shapes[f"rnn.weight_ih_l{k}"] = (g * h, e if k == 0 else h)
        shapes[f"rnn.weight_hh_l{k}"] = (g * h, h)
        shapes[f"rnn.bias_ih_l{k}"] = (g * h,)
        shapes[f"rnn.bias_hh_l{k}"] = (g * h,)
    shapes["head.weight"] = (v, h)
    shapes["head.bias"] = (v,)
    return shapes


def _index(text: str, limit: int) -> int | None:
    """A canonical decimal index below limit ('0', '12'; not '012' or '+1'), else None."""
    if re.fullmatch(r"0|[1-9][0-9]{0,8}", text) and int(text) < limit:
        return int(text)
    return None


def _check_entries(f: TensorFile, meta: dict, cfg: ModelConfig) -> None:
    """Every tensor's name, dtype and shape against the recorded config; nothing missing, nothing extra."""
    path = f.path
    expected = model_tensor_shapes(cfg)
    params = list(expected.values())
    for name, e in f.entries.items():  # the weights first: they say most about what is wrong
        if name.startswith(MODEL_PREFIX):
            key = name[len(MODEL_PREFIX):]
            if key not in expected:
                raise CharlmError(f"{path} holds a tensor {name[:80]!r} that its model config ({_describe(cfg)}) does not have")
            if e.dtype != "F32" or e.shape != expected[key]:
                raise CharlmError(f"{path}: tensor {name} is {e.dtype} {list(e.shape)}, but its model config "
                                  f"({_describe(cfg)}) needs F32 {list(expected[key])}")
        elif name != TOKENIZER_TENSOR and not name.startswith(STATE_PREFIX):
            raise CharlmError(f"{path} holds a tensor {name[:80]!r} that is not part of a charlm checkpoint")
    missing = [MODEL_PREFIX + k for k in expected if MODEL_PREFIX + k not in f.entries]
    if missing:
        raise CharlmError(f"{path} lacks {len(missing)} tensor(s) its model config ({_describe(cfg)}) needs: "
                          f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for name, e in f.entries.items():
        if name == TOKENIZER_TENSOR and (e.dtype != "U8" or len(e.shape) != 1):
            raise CharlmError(f"{path}: tensor {name} is {e.dtype} {list(e.shape)}; a serialized tokenizer is U8 [n]")
        if name.startswith(STATE_PREFIX):
            _check_state_entry(path, name[len(STATE_PREFIX):], e, cfg, params)
    kind = meta["vocab"].get("kind")
    if kind == "spm" and TOKENIZER_TENSOR not in f.entries:
        raise CharlmError(f"{path} uses a SentencePiece vocabulary but holds no serialized model ({TOKENIZER_TENSOR})")
    if kind != "spm" and TOKENIZER_TENSOR in f.entries:
        raise CharlmError(f"{path} has a {str(kind)[:20]} vocabulary but also a SentencePiece tokenizer tensor: one of them is wrong")
    _check_state_set(f, meta, cfg)


def _describe(cfg: ModelConfig) -> str:
    return f"{cfg.cell} {cfg.num_layers}x{cfg.rnn_size}, embed {cfg.embed_size}, vocab {cfg.vocab_size}"


def _check_state_entry(path: Path, key: str, e, cfg: ModelConfig, params: list[tuple[int, ...]]) -> None:
    parts = key.split(".")
    if key == "rng.torch":
        n = torch.get_rng_state().numel()
        ok, need = e.dtype == "U8" and e.shape == (n,), f"U8 [{n}] (torch's generator state)"
    elif len(parts) == 3 and parts[:2] == ["rng", "cuda"] and _index(parts[2], 1024) is not None:
        ok, need = e.dtype == "U8" and len(e.shape) == 1 and 1 <= e.shape[0] <= 4096, "U8 [n] (a CUDA generator state)"
    elif len(parts) == 2 and parts[0] == "hidden" and _index(parts[1], 2) is not None:
        L, H = cfg.num_layers, cfg.rnn_size
        ok = e.dtype in HIDDEN_DTYPES and len(e.shape) == 3 and e.shape[0] == L and e.shape[1] >= 1 and e.shape[2] == H
        need = f"F32 [{L}, rows, {H}] (num_layers, rows, rnn_size)"
    elif len(parts) == 3 and parts[0] == "optim" and parts[2] in ADAM_SLOTS and _index(parts[1], 1 << 30) is not None:
        i = int(parts[1])
        if i >= len(params):
            raise CharlmError(f"{path}: optimizer state train_state.{key} for parameter {i}, but the model has {len(params)}")
        shape = () if parts[2] == "step" else params[i]
        ok, need = e.dtype == "F32" and e.shape == shape, f"F32 {list(shape)}"
    else:
        raise CharlmError(f"{path} holds an unknown training-state tensor train_state.{key[:80]}")
    if not ok:
        raise CharlmError(f"{path}: training-state tensor train_state.{key} is {e.dtype} {list(e.shape)}; expected {need}")


def _check_state_set(f: TensorFile, meta: dict, cfg: ModelConfig) -> None:
    """The training state is whole: tensors come with their progress record, each group complete.

    (A best file keeps the progress record without the tensors: it is not resumable.)
    """
    path = f.path
    keys = [n[len(STATE_PREFIX):] for n in f.entries if n.startswith(STATE_PREFIX)]
    if not keys:
        return
    if "train_state" not in meta:
        raise CharlmError(f"{path} is corrupt: it has training-state tensors but no training-state record")
    if "rng.torch" not in keys:
        raise CharlmError(f"{path} is corrupt: its training state lacks the random generator state (train_state.rng.torch)")
    hidden = sorted(int(k.split(".")[1]) for k in keys if k.startswith("hidden."))
    count = 2 if cfg.cell == "lstm" else 1
    if hidden and hidden != list(range(count)):
        raise CharlmError(f"{path}: the carried state of an {cfg.cell} model is {count} tensor(s) "
                          f"(train_state.hidden.0{', .1' if count == 2 else ''}), not {len(hidden)}")
    if count == 2 and hidden and f.entries[STATE_PREFIX + "hidden.0"].shape != f.entries[STATE_PREFIX + "hidden.1"].shape:
        raise CharlmError(f"{path}: the carried states train_state.hidden.0 and .1 differ in shape")
    cuda = sorted(int(k.split(".")[2]) for k in keys if k.startswith("rng.cuda."))
    if cuda != list(range(len(cuda))):
        raise CharlmError(f"{path} is corrupt: its CUDA generator states are not numbered 0, 1, ...")
    slots: dict[str, set] = {}
    for k in keys:
        if k.startswith("optim."):
            _, i, name = k.split(".")
            slots.setdefault(i, set()).add(name)
    for i, names in slots.items():
        if names != set(ADAM_SLOTS):
            raise CharlmError(f"{path}: the optimizer state of parameter {i} lacks {', '.join(sorted(set(ADAM_SLOTS) - names))}")


def _verify_checksums(f: TensorFile) -> str:
    """'verified', or 'none' for a file written before checksums; a mismatch is an error."""
    have = [k for k in (WEIGHTS_SHA256, RECORD_SHA256) if k in f.metadata]
    if not have:
        return "none"
    if len(have) == 1:
        raise CharlmError(f"{f.path} is corrupt: it has {have[0]} but no {({WEIGHTS_SHA256, RECORD_SHA256} - set(have)).pop()}")
    weights, others = _digest_order(f.entries)
    if f.digest(weights) != f.metadata[WEIGHTS_SHA256]:
        raise CharlmError(f"{f.path} is corrupt: its weights do not match their sha256 checksum; use another checkpoint")
    if f.digest(others, prefix=_utf8(f.metadata["meta"])) != f.metadata[RECORD_SHA256]:
        raise CharlmError(f"{f.path} is corrupt: its metadata or training state does not match its sha256 checksum; "
                          "use another checkpoint")
    return "verified"


def _checked_vocab(f: TensorFile, meta: dict, cfg: ModelConfig):
    blob = bytes(f.view(TOKENIZER_TENSOR)) if TOKENIZER_TENSOR in f.entries else None
    try:
        vocab = load_vocab(meta["vocab"], blob, where=str(f.path))
    except CharlmError as e:
        message = str(e)
        raise CharlmError(message if str(f.path) in message else f"{f.path}: {message}") from None
    if len(vocab) != cfg.vocab_size:
        raise CharlmError(f"{f.path}: its vocabulary has {len(vocab)} symbols but the model's output has {cfg.vocab_size} "
                          "(model.vocab_size): corrupt")
    return vocab


def _check_values(path: Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Weights and training state are finite numbers (a NaN weight makes every output NaN), and small
    enough that no output can overflow float32 (finite weights near 1e38 give NaN log-probs too)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "weights" if name.startswith(MODEL_PREFIX) else "training state"
            raise CharlmError(f"{path}: tensor {name} holds NaN or infinite values: its {what} cannot be used")
        if name.endswith(".exp_avg_sq") and bool((t < 0).any()):
            raise CharlmError(f"{path}: tensor {name} holds negative values: a second moment is never negative (corrupt)")
    # Every cell's output is in [-1, 1] (tanh, or a gate times tanh), so each layer's pre-activations
    # are bounded by the row sums of |W| times the input bound, plus |b|: below MAX_ACTIVATION
    # everywhere, every product and partial sum the network computes is finite, and so are its log-probs.
    w = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    x = float(w["embed.weight"].abs().max()) if w["embed.weight"].numel() else 0.0
    layers = [(f"rnn.weight_ih_l{k}", f"rnn.weight_hh_l{k}", f"rnn.bias_ih_l{k}", f"rnn.bias_hh_l{k}") for k in range(cfg.num_layers)]
    for k, (wi, wh, bi, bh) in enumerate(layers):
        bound = (_row_sums(w[wi]) * x + _row_sums(w[wh]) + w[bi].double().abs() + w[bh].double().abs()).max()
        if not float(bound) <= MAX_ACTIVATION:
            raise CharlmError(f"{path}: the weights of layer {k} are so large that its activations overflow float32: corrupt")
        x = 1.0
    if not float((_row_sums(w["head.weight"]) + w["head.bias"].double().abs()).max()) <= MAX_ACTIVATION:
        raise CharlmError(f"{path}: the output layer's weights are so large that its logits overflow float32: corrupt")


MAX_ACTIVATION = 1e30  # trained weights give pre-activations of order 1 to 100


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sum(dim=1, dtype=torch.float64)


# -- the training state -----------------------------------------------------------------------

def pack_train_state(optimizer: torch.optim.Optimizer, hidden: tuple[torch.Tensor, ...] = (),
                     cuda: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a resumable file (without the prefix): RNG states, carried state, AdamW state.

    The progress record (step, epoch, ...) goes into meta["train_state"]; see unpack_train_state.
    """
    tensors = {"rng.torch": torch.get_rng_state()}
    if cuda:
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for i, s in enumerate(hidden):
        tensors[f"hidden.{i}"] = s  # (num_layers, all rows, H)
    for idx, slots in optimizer.state_dict()["state"].items():
        for name, value in slots.items():
            tensors[f"optim.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def unpack_train_state(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress_type,
                       device: torch.device | None = None) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """Check a checkpoint's training state against this model and optimizer, then restore both and the RNG.

    Returns the progress record (fields of the dataclass progress_type, checked) and the carried
    state tensors (num_layers, rows, H) as saved. Nothing is changed unless everything checks.
    """
    where = ckpt.path
    tensors = ckpt.train_tensors()
    if "train_state" not in ckpt.meta or "rng.torch" not in tensors:
        raise CharlmError(f"{where} holds no training state (a best/exported file); resume from last.safetensors or use --init-from")
    progress = _progress(ckpt.meta["train_state"], progress_type, where)
    weights, own = ckpt.model_state(), model.state_dict()
    differ = sorted(k for k in own.keys() | weights.keys()
                    if k not in own or k not in weights or tuple(own[k].shape) != tuple(weights[k].shape))
    if differ:
        k = differ[0]
        shapes = f"{list(weights[k].shape) if k in weights else 'absent'} in the checkpoint, {list(own[k].shape) if k in own else 'absent'} here"
        raise CharlmError(f"{where}: the model being trained is not the checkpoint's ({k}: {shapes})")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".")
            i = int(idx)
            if i >= len(params) or (name != "step" and tuple(value.shape) != tuple(params[i].shape)):
                raise CharlmError(f"{where}: optimizer state train_state.{key} does not fit parameter {i} of this model")
            slots.setdefault(i, {})[name] = value
    rng = tensors["rng.torch"]
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CharlmError(f"{where}: the saved random generator state has the wrong size")
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    # float32: what the model computes in (autocast casts it where it runs in 16 bits)
    hidden = tuple(tensors[f"hidden.{j}"].float() for j in range(sum(k.startswith("hidden.") for k in tensors)))
    cfg = getattr(model, "cfg", None)
    if hidden and cfg is not None:
        count = 2 if cfg.cell == "lstm" else 1
        if len(hidden) != count or any(h.dim() != 3 or h.shape[0] != cfg.num_layers or h.shape[2] != cfg.rnn_size for h in hidden):
            raise CharlmError(f"{where}: the carried state does not fit this model ({count} x [{cfg.num_layers}, rows, {cfg.rnn_size}])")
    # Everything checks: only now is anything changed.
    model.load_state_dict(weights)
    optimizer.load_state_dict({"state": slots, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(rng)
    if device is not None and device.type == "cuda" and cuda and len(cuda) == torch.cuda.device_count():
        if all(s.shape == torch.cuda.get_rng_state(i).shape for i, s in enumerate(cuda)):
            torch.cuda.set_rng_state_all(cuda)
    return progress, hidden


def _progress(record: dict, progress_type, where: Path) -> dict:
    """The progress record, each field as its dataclass declares it (int or float); unknown fields are refused."""
    known = {f.name: str(f.type) for f in dataclasses.fields(progress_type)}
    unknown = sorted(set(record) - set(known))
    if unknown:
        raise CharlmError(f"{where}: unknown training-state field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; "
                          "written by a newer charlm, or corrupt")
    return {name: _check_state_field(where, name, value, known[name].startswith("int")) for name, value in record.items()}
