"""Growing a trained model's vocabulary, for fine-tuning on a text with characters it never saw.

The new text is prepared against the checkpoint's vocabulary (Vocab.extended: every old id kept,
the new characters appended), and the weights grow by one row per new character in the two
places that have one per symbol, the embedding and the output layer; everything else carries over.

- A new character's embedding is the mean of the old ones: an input the model has never seen
  starts as "an average character", not as noise that would throw its state off.
- A new character's output row is zero, so its logit is its bias alone: a constant. The bias is
  set so that at the low end of the old model's output (the 1st percentile of log-normaliser
  log Z over a sample of the new text, read with the grown model) all new characters together get
  NEW_MASS of the probability. The old text then scores within -log2(1 - NEW_MASS) ~ 0.0003
  bits/char of what it scored (less where Z is larger), while each new character has a small,
  finite probability, large enough that its bias is learned in a few hundred steps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from charlm.errors import CharlmError, DataError

if TYPE_CHECKING:
    from charlm.checkpoint import Checkpoint
    from charlm.data import PreparedData

NEW_MASS = 2e-4  # the probability all new characters share, at most, before fine-tuning (0.0003 bits/char)
EMBED, HEAD_W, HEAD_B = "embed.weight", "head.weight", "head.bias"


def grown_state(state: dict[str, Tensor], added: int) -> dict[str, Tensor]:
    """The weights with `added` rows appended to the embedding and the output layer (new biases at -inf
    for now: grown_bias sets them once the grown model can read the new text)."""
    if added < 1:
        raise CharlmError("nothing to grow: the new vocabulary adds no symbol")
    out = dict(state)
    emb, w, b = state[EMBED], state[HEAD_W], state[HEAD_B]
    out[EMBED] = torch.cat([emb, emb.mean(dim=0, keepdim=True).expand(added, -1)])
    out[HEAD_W] = torch.cat([w, torch.zeros(added, w.shape[1], dtype=w.dtype)])
    out[HEAD_B] = torch.cat([b, torch.full((added,), float("-inf"), dtype=b.dtype)])
    return out


@torch.no_grad()
def set_new_bias(model: torch.nn.Module, old_size: int, sample: Tensor) -> float:
    """Set the bias of the output rows past old_size from the model's log Z over a sample of ids (B, T); returns it."""
    added = model.head.bias.shape[0] - old_size
    logits, _ = model(sample)  # (B, T, V); the new rows' logits are -inf, so this is the old model's log Z
    log_z = torch.logsumexp(logits[..., :old_size].float(), dim=-1).flatten()
    low = float(torch.quantile(log_z, 0.01)) if log_z.numel() > 1 else float(log_z[0])
    # k new symbols at bias b share k e^b / (Z + k e^b) = NEW_MASS at log Z = low.
    bias = low + math.log(NEW_MASS / (1 - NEW_MASS)) - math.log(added)
    model.head.bias[old_size:] = bias
    return bias


SAMPLE_TOKENS = 4096  # of the new text, read to place the new characters' bias


def load_into(model: torch.nn.Module, ckpt: Checkpoint, data: PreparedData) -> None:
    """--init-from: the checkpoint's weights into `model`, grown by the characters `data` adds to the
    checkpoint's vocabulary (data prepared against it: old ids first); an error naming both otherwise."""
    old, new = ckpt.vocab, data.vocab
    state = ckpt.model_state()
    if new != old:
        if not extends(new, old):
            source = ", ".join(map(str, data.meta.get("source", {}).get("paths", [])[:2])) or str(data.dir)
            why = (
                "SentencePiece tokenizers differ; fine-tune on data prepared with the checkpoint's own tokenizer"
                if "spm" in (old.kind, new.kind)
                else "the text was prepared with its own vocabulary; prepare it against the checkpoint's: "
                f"charlm prepare TEXT -o DIR --vocab-from {ckpt.path} (train TEXT --init-from does this itself)"
            )
            raise DataError(f"--init-from {ckpt.path} cannot continue on {source}: {why}")
        state = grown_state(state, len(new) - len(old))
    check_fits(model, state, ckpt)
    model.load_state_dict(state)
    if len(new) > len(old):
        was_training = model.training
        model.eval()
        sample = torch.from_numpy(data.tokens("train")[:SAMPLE_TOKENS].astype("int64")).view(1, -1)
        set_new_bias(model, len(old), sample.to(model.head.weight.device))
        model.train(was_training)


def extends(new, old) -> bool:
    """Whether vocabulary `new` is `old` with symbols appended (every old id names the same symbol)."""
    if new.kind != old.kind or new.kind == "spm" or len(new) < len(old):
        return False
    return bool((new.codes[: len(old)] == old.codes).all())


def check_fits(model: torch.nn.Module, theirs: dict[str, Tensor], ckpt: Checkpoint) -> None:
    """The weights fit the model's shape, or an error naming the shapes that differ and what to leave out."""
    ours = model.state_dict()
    differ = [
        f"{k} is {tuple(theirs[k].shape)} there, {tuple(v.shape)} here"
        for k, v in ours.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    missing = sorted(set(ours) - set(theirs)) + sorted(set(theirs) - set(ours))
    if differ or missing:
        what = "; ".join(differ[:3] + [f"{k} is in only one of them" for k in missing[:3]])
        raise CharlmError(
            f"--init-from {ckpt.path}: its weights do not fit this model ({what}); leave out the --cell, --num-layers, "
            "--rnn-size and --embed-size flags to take its shape"
        )


def frozen_parameters(model: torch.nn.Module, layers: int) -> list[torch.nn.Parameter]:
    """The embedding and the lowest `layers` recurrent layers' parameters (--freeze-layers K)."""
    if layers < 1:
        return []
    if layers > model.rnn.num_layers:
        raise CharlmError(f"--freeze-layers {layers}: the model has {model.rnn.num_layers} recurrent layers")
    frozen = [model.embed.weight] + [w for k in range(layers) for w in model.rnn.weights(k) if isinstance(w, torch.nn.Parameter)]
    return frozen


def lineage(ckpt: Checkpoint, data: PreparedData) -> list[dict]:
    """The provenance chain of a fine-tuned run, newest first: this run's starting checkpoint (path, the
    sha256 of its weights) and the text it continues on, then that checkpoint's own chain."""
    source = data.meta.get("source", {})
    from charlm import checkpoint

    entry = {
        "checkpoint": str(ckpt.path),
        "weights_sha256": checkpoint.weights_sha256(ckpt),
        "on": (source.get("paths") or [str(data.dir)])[0],
        "on_sha256": source.get("sha256"),
    }
    earlier = (ckpt.meta.get("provenance") or {}).get("fine_tuned_from") or []
    return [entry] + [e for e in earlier if isinstance(e, dict)][:20]


def recorded_lineage(ckpt: Checkpoint | None) -> list[dict] | None:
    """The provenance chain a checkpoint records (a resumed fine-tuning run keeps its own), or None."""
    return None if ckpt is None else (ckpt.meta.get("provenance") or {}).get("fine_tuned_from")
