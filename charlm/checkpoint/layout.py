"""The names and constants of the checkpoint file's layout, shared by the reader, the checks and the training state."""

import re

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
TRAIN_STATE_INTS = ("step", "epoch", "window", "tokens", "best_step", "ss_step")  # the other known fields are floats
PART_FILE = re.compile(r"\..+\.[A-Za-z0-9_]+\.part")  # what save's mkstemp names its temporary files


def digest_order(names) -> tuple[list[str], list[str]]:
    """The tensor names each checksum covers, in the order it covers them: model.* ones, then all others."""
    names = sorted(names)
    return [k for k in names if k.startswith(MODEL_PREFIX)], [k for k in names if not k.startswith(MODEL_PREFIX)]


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate (JSON "\ud800") still hashes
