"""The checks a checkpoint passes before it is trusted: metadata types, the config (as for flags),
every tensor's name, dtype and shape against that config, the training state's record and tensors,
the checksums, the vocabulary against the output and the tokenizer, finite and bounded weights."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from charlm import config
from charlm.cells import cell_class
from charlm.checkpoint.layout import (
    ADAM_SLOTS,
    CAN_BE_INFINITE,
    FORMAT,
    HIDDEN_DTYPES,
    MAPPING_SECTIONS,
    MODEL_PREFIX,
    RECORD_SHA256,
    REQUIRED_SECTIONS,
    STATE_PREFIX,
    TOKENIZER_TENSOR,
    TRAIN_STATE_INTS,
    VERSION,
    WEIGHTS_SHA256,
    digest_order,
    utf8,
)
from charlm.checkpoint.tensorfile import (
    TensorFile,
    parse_json,
)
from charlm.config import ModelConfig
from charlm.errors import CharlmError, CheckpointError
from charlm.model import parameter_shapes
from charlm.tokenizers.vocab import load_vocab


def checked_meta(f: TensorFile) -> dict:
    path, md = f.path, f.metadata
    if md.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charlm checkpoint (no '{FORMAT}' format field)")
    version = md.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,6}", version) or int(version) < 1:
        raise CheckpointError(f"{path} has an unreadable format version")
    if int(version) > VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format version {int(version)}; this charlm reads up to {VERSION}: upgrade charlm"
        )
    try:
        meta = parse_json(md.get("meta", ""), allow_nonfinite=True)  # metrics may be NaN, best_val Infinity
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupt (unreadable metadata: {e}); use another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt (its metadata is not a JSON object); use another checkpoint")
    for name in REQUIRED_SECTIONS:
        if name not in meta:
            raise CheckpointError(f"{path} is corrupt: its metadata has no {name!r} section")
    for name in MAPPING_SECTIONS:
        if name in meta and not isinstance(meta[name], dict):
            raise CheckpointError(f"{path} is corrupt: metadata section {name!r} is not a mapping")
    model_cfg, train_cfg = config.from_record(meta["model"], meta["train"], str(path))
    meta["model"], meta["train"] = dataclasses.asdict(model_cfg), dataclasses.asdict(train_cfg)
    for key, value in meta.get("metrics", {}).items():
        if isinstance(value, (dict, list)):
            raise CheckpointError(f"{path} is corrupt: metrics.{key[:40]} is not a single value")
    provenance = meta.get("provenance", {})
    if not isinstance(provenance.get("data_dir", ""), str):
        raise CheckpointError(f"{path} is corrupt: provenance.data_dir is not a path")
    for key, value in meta.get("train_state", {}).items():
        check_state_field(path, key, value, key in TRAIN_STATE_INTS)
    return meta


def check_state_field(path: Path, key: str, value: Any, integer: bool) -> float | int:
    """A progress field: an integer >= 0, or a finite float >= 0 (best_val: or Infinity, before the first evaluation)."""
    if integer:
        ok, need = type(value) is int and 0 <= value <= config.MAX_COUNT, "an integer >= 0"
    else:
        ok = (
            type(value) in (int, float)
            and (math.isfinite(value) or (key in CAN_BE_INFINITE and value == math.inf))
            and value >= 0
        )
        need = "a finite number >= 0" + (" (or Infinity)" if key in CAN_BE_INFINITE else "")
    if not ok:
        raise CheckpointError(f"{path}: training-state field {key[:40]} must be {need} (got {_short(value)})")
    return value if integer else float(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def model_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every CharRNN parameter's name and shape, in model.parameters() order, for the recorded cell (nothing allocated)."""
    return parameter_shapes(cfg)


def _index(text: str, limit: int) -> int | None:
    """A canonical decimal index below limit ('0', '12'; not '012' or '+1'), else None."""
    if re.fullmatch(r"0|[1-9][0-9]{0,8}", text) and int(text) < limit:
        return int(text)
    return None


def check_entries(f: TensorFile, meta: dict, cfg: ModelConfig) -> None:
    """Every tensor's name, dtype and shape against the recorded config; nothing missing, nothing extra."""
    path = f.path
    expected = model_tensor_shapes(cfg)
    params = list(expected.values())
    for name, e in f.entries.items():  # the weights first: they say most about what is wrong
        if name.startswith(MODEL_PREFIX):
            key = name[len(MODEL_PREFIX) :]
            if key not in expected:
                raise CheckpointError(
                    f"{path} holds a tensor {name[:80]!r} that its model config ({_describe(cfg)}) does not have"
                )
            if e.dtype != "F32" or e.shape != expected[key]:
                raise CheckpointError(
                    f"{path}: tensor {name} is {e.dtype} {list(e.shape)}, but its model config "
                    f"({_describe(cfg)}) needs F32 {list(expected[key])}"
                )
        elif name != TOKENIZER_TENSOR and not name.startswith(STATE_PREFIX):
            raise CheckpointError(f"{path} holds a tensor {name[:80]!r} that is not part of a charlm checkpoint")
    missing = [MODEL_PREFIX + k for k in expected if MODEL_PREFIX + k not in f.entries]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) its model config ({_describe(cfg)}) needs: "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    for name, e in f.entries.items():
        if name == TOKENIZER_TENSOR and (e.dtype != "U8" or len(e.shape) != 1):
            raise CheckpointError(f"{path}: tensor {name} is {e.dtype} {list(e.shape)}; a serialized tokenizer is U8 [n]")
        if name.startswith(STATE_PREFIX):
            _check_state_entry(path, name[len(STATE_PREFIX) :], e, cfg, params)
    kind = meta["vocab"].get("kind")
    if kind == "spm" and TOKENIZER_TENSOR not in f.entries:
        raise CheckpointError(f"{path} uses a SentencePiece vocabulary but holds no serialized model ({TOKENIZER_TENSOR})")
    if kind != "spm" and TOKENIZER_TENSOR in f.entries:
        raise CheckpointError(
            f"{path} has a {str(kind)[:20]} vocabulary but also a SentencePiece tokenizer tensor: one of them is wrong"
        )
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
            raise CheckpointError(f"{path}: optimizer state train_state.{key} for parameter {i}, but the model has {len(params)}")
        shape = () if parts[2] == "step" else params[i]
        ok, need = e.dtype == "F32" and e.shape == shape, f"F32 {list(shape)}"
    else:
        raise CheckpointError(f"{path} holds an unknown training-state tensor train_state.{key[:80]}")
    if not ok:
        raise CheckpointError(f"{path}: training-state tensor train_state.{key} is {e.dtype} {list(e.shape)}; expected {need}")


def _check_state_set(f: TensorFile, meta: dict, cfg: ModelConfig) -> None:
    """The training state is whole: tensors come with their progress record, each group complete.

    (A best file keeps the progress record without the tensors: it is not resumable.)
    """
    path = f.path
    keys = [n[len(STATE_PREFIX) :] for n in f.entries if n.startswith(STATE_PREFIX)]
    if not keys:
        return
    if "train_state" not in meta:
        raise CheckpointError(f"{path} is corrupt: it has training-state tensors but no training-state record")
    if "rng.torch" not in keys:
        raise CheckpointError(f"{path} is corrupt: its training state lacks the random generator state (train_state.rng.torch)")
    hidden = sorted(int(k.split(".")[1]) for k in keys if k.startswith("hidden."))
    count = len(cell_class(cfg.cell).state_names)  # the cell's state tensors: lstm (h, c), gru (h), ...
    if hidden and hidden != list(range(count)):
        names = ", ".join(f".{j}" for j in range(1, count))
        raise CheckpointError(
            f"{path}: the carried state of a {cfg.cell} model is {count} tensor(s) "
            f"(train_state.hidden.0{', ' + names if names else ''}), not {len(hidden)}"
        )
    if hidden and len({f.entries[STATE_PREFIX + f"hidden.{j}"].shape for j in range(count)}) > 1:
        raise CheckpointError(f"{path}: the carried states train_state.hidden.0 .. .{count - 1} differ in shape")
    cuda = sorted(int(k.split(".")[2]) for k in keys if k.startswith("rng.cuda."))
    if cuda != list(range(len(cuda))):
        raise CheckpointError(f"{path} is corrupt: its CUDA generator states are not numbered 0, 1, ...")
    slots: dict[str, set] = {}
    for k in keys:
        if k.startswith("optim."):
            _, i, name = k.split(".")
            slots.setdefault(i, set()).add(name)
    for i, names in slots.items():
        if names != set(ADAM_SLOTS):
            raise CheckpointError(
                f"{path}: the optimizer state of parameter {i} lacks {', '.join(sorted(set(ADAM_SLOTS) - names))}"
            )


def verify_checksums(f: TensorFile) -> str:
    """'verified', or 'none' for a file written before checksums; a mismatch is an error."""
    have = [k for k in (WEIGHTS_SHA256, RECORD_SHA256) if k in f.metadata]
    if not have:
        return "none"
    if len(have) == 1:
        raise CheckpointError(
            f"{f.path} is corrupt: it has {have[0]} but no {({WEIGHTS_SHA256, RECORD_SHA256} - set(have)).pop()}"
        )
    weights, others = digest_order(f.entries)
    if f.digest(weights) != f.metadata[WEIGHTS_SHA256]:
        raise CheckpointError(f"{f.path} is corrupt: its weights do not match their sha256 checksum; use another checkpoint")
    if f.digest(others, prefix=utf8(f.metadata["meta"])) != f.metadata[RECORD_SHA256]:
        raise CheckpointError(
            f"{f.path} is corrupt: its metadata or training state does not match its sha256 checksum; use another checkpoint"
        )
    return "verified"


def checked_vocab(f: TensorFile, meta: dict, cfg: ModelConfig):
    blob = bytes(f.view(TOKENIZER_TENSOR)) if TOKENIZER_TENSOR in f.entries else None
    try:
        vocab = load_vocab(meta["vocab"], blob, where=str(f.path))
    except CharlmError as e:
        message = str(e)
        raise CheckpointError(message if str(f.path) in message else f"{f.path}: {message}") from None
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(
            f"{f.path}: its vocabulary has {len(vocab)} symbols but the model's output has {cfg.vocab_size} "
            "(model.vocab_size): corrupt"
        )
    return vocab


def check_values(path: Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Weights and training state are finite numbers (a NaN weight makes every output NaN), and small
    enough that no output can overflow float32 (finite weights near 1e38 give NaN log-probs too)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "weights" if name.startswith(MODEL_PREFIX) else "training state"
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values: its {what} cannot be used")
        if name.endswith(".exp_avg_sq") and bool((t < 0).any()):
            raise CheckpointError(f"{path}: tensor {name} holds negative values: a second moment is never negative (corrupt)")
    # Every cell's output is in [-1, 1] (tanh, a gate times tanh, or a mix of such), so every pre-
    # activation of a recurrent layer is bounded by what its weights can sum to: the row sums of |W|
    # times the input bound, plus |b|. The sum of that over all the cell's tensors bounds any layer
    # (written for no cell in particular): below MAX_ACTIVATION every product and partial sum the
    # network computes is finite, and so are its log-probs.
    w = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    x = max(float(w["embed.weight"].abs().max()) if w["embed.weight"].numel() else 0.0, 1.0)
    bound = sum(
        float(_row_sums(t.reshape(t.shape[0], -1)).max() * x) if t.dim() > 1 else float(t.double().abs().max())
        for name, t in w.items()
        if name.startswith("rnn.") and t.numel()
    )
    if not bound <= MAX_ACTIVATION:
        raise CheckpointError(f"{path}: the recurrent weights are so large that activations overflow float32: corrupt")
    if not float((_row_sums(w["head.weight"]) + w["head.bias"].double().abs()).max()) <= MAX_ACTIVATION:
        raise CheckpointError(f"{path}: the output layer's weights are so large that its logits overflow float32: corrupt")


MAX_ACTIVATION = 1e30  # trained weights give pre-activations of order 1 to 100


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sum(dim=1, dtype=torch.float64)
