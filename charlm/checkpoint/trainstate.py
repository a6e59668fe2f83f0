"""The training state inside a checkpoint: packed from the optimizer, RNG and carried state, and
unpacked, checked against the model and optimizer before either is touched."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from charlm.cells import cell_class
from charlm.checkpoint.checks import check_state_field
from charlm.errors import CheckpointError

if TYPE_CHECKING:
    from charlm.checkpoint import Checkpoint


def pack_train_state(
    optimizer: torch.optim.Optimizer, hidden: tuple[torch.Tensor, ...] = (), cuda: bool = False
) -> dict[str, torch.Tensor]:
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


# The trainer's AdamW keeps torch's default betas; its exp_avg_sq is bias-corrected with this beta2.
ADAM_BETA2 = 0.999


def gradient_second_moments(ckpt: Checkpoint) -> list[torch.Tensor] | None:
    """The training run's mean squared gradient per parameter (model.parameters() order): AdamW's
    exp_avg_sq, bias-corrected, an average over the last ~1000 training batches. None for a file
    without optimizer state (best.safetensors, an exported file) or one saved before the first step.

    Dynamic evaluation's RMS-normalised update needs these; only this module knows the key names.
    """
    tensors = ckpt.train_tensors()
    moments = []
    while f"optim.{len(moments)}.exp_avg_sq" in tensors:
        i = len(moments)
        step = float(tensors.get(f"optim.{i}.step", torch.zeros(())))
        if step < 1:
            return None
        moments.append(tensors[f"optim.{i}.exp_avg_sq"].float() / (1.0 - ADAM_BETA2**step))
    return moments or None


def unpack_train_state(
    ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress_type, device: torch.device | None = None
) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """Check a checkpoint's training state against this model and optimizer, then restore both and the RNG.

    Returns the progress record (fields of the dataclass progress_type, checked) and the carried
    state tensors (num_layers, rows, H) as saved. Nothing is changed unless everything checks.
    """
    where = ckpt.path
    tensors = ckpt.train_tensors()
    if "train_state" not in ckpt.meta or "rng.torch" not in tensors:
        raise CheckpointError(
            f"{where} holds no training state (a best/exported file); resume from last.safetensors or use --init-from"
        )
    progress = _progress(ckpt.meta["train_state"], progress_type, where)
    weights, own = ckpt.model_state(), model.state_dict()
    differ = sorted(
        k
        for k in own.keys() | weights.keys()
        if k not in own or k not in weights or tuple(own[k].shape) != tuple(weights[k].shape)
    )
    if differ:
        k = differ[0]
        shapes = f"{list(weights[k].shape) if k in weights else 'absent'} in the checkpoint, {list(own[k].shape) if k in own else 'absent'} here"
        raise CheckpointError(f"{where}: the model being trained is not the checkpoint's ({k}: {shapes})")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".")
            i = int(idx)
            if i >= len(params) or (name != "step" and tuple(value.shape) != tuple(params[i].shape)):
                raise CheckpointError(f"{where}: optimizer state train_state.{key} does not fit parameter {i} of this model")
            slots.setdefault(i, {})[name] = value
    rng = tensors["rng.torch"]
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{where}: the saved random generator state has the wrong size")
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    # float32: what the model computes in (autocast casts it where it runs in 16 bits)
    hidden = tuple(tensors[f"hidden.{j}"].float() for j in range(sum(k.startswith("hidden.") for k in tensors)))
    cfg = getattr(model, "cfg", None)
    if hidden and cfg is not None:
        count = len(cell_class(cfg.cell).state_names)
        if len(hidden) != count or any(
            h.dim() != 3 or h.shape[0] != cfg.num_layers or h.shape[2] != cfg.rnn_size for h in hidden
        ):
            raise CheckpointError(
                f"{where}: the carried state does not fit this model ({count} x [{cfg.num_layers}, rows, {cfg.rnn_size}])"
            )
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
        raise CheckpointError(
            f"{where}: unknown training-state field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; "
            "written by a newer charlm, or corrupt"
        )
    return {name: check_state_field(where, name, value, known[name].startswith("int")) for name, value in record.items()}
