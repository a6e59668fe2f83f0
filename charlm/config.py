"""Typed configuration: defaults < preset < --config file < explicit flags."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from charlm.errors import CharlmError, OptionError
from charlm.cells import cell_names

SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("fp32", "bf16")  # training, and whole-window scoring (eval)
DECODE_DTYPES = DTYPES + ("int8",)  # step-by-step decoding (sample, beam): int8 weights, charlm/cells/products.py
DEVICES = ("auto", "cpu", "cuda", "mps")
SS_SCHEDULES = ("none", "linear", "exponential", "inverse-sigmoid")  # scheduled sampling: charlm/training/scheduled.py
SS_MODES = ("model", "uniform")

# Upper bounds, for flags, presets, YAML files and checkpoints alike. They are far above any
# character model worth training and far below what would exhaust memory before a clear error.
MAX_LAYERS = 64
MAX_WIDTH = 16384  # rnn_size and embed_size: one 16384-wide LSTM layer alone has 2.1 billion weights
MAX_VOCAB = 1 << 21  # every Unicode code point (1,114,112) fits, and any SentencePiece vocabulary
MAX_PARAMETERS = 1 << 31  # 2,147,483,648 weights: 8 GiB in fp32, 32 GiB with gradients and AdamW moments
MAX_STREAMS = 1 << 20  # batch_size and seq_length
MAX_COUNT = (1 << 63) - 1  # seeds, step counts: what a signed 64-bit integer holds (torch's seeds, JSON readers)


@dataclass
class ModelConfig:
    cell: str = "lstm"  # recurrent cell: a name in the registry (charlm/cells/: lstm, gru, rnn, ...)
    num_layers: int = 2  # stacked recurrent layers
    rnn_size: int = 256  # hidden units per layer
    embed_size: int = 64  # character embedding width fed to the first layer
    dropout: float = 0.0  # between layers and before the head; 0 disables
    forget_bias: float = 0.0  # LSTM family (lstm, peephole, minlstm): the forget gate's initial bias (measured: docs/results.md)
    vocab_size: int = 0  # set from the prepared data, never by hand


@dataclass
class TrainConfig:
    batch_size: int = 64  # B: contiguous streams the training text is cut into
    seq_length: int = 100  # T: steps per window; gradients flow back this far
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 5.0  # clip the global gradient norm to this; 0 disables
    schedule: str = "constant"  # constant, step (x lr_decay every decay_every steps) or cosine
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    lr_decay: float = 0.5  # step schedule: multiply the lr by this ...
    decay_every: int = 1000  # ... every this many steps
    min_lr_ratio: float = 0.1  # cosine schedule: floor as a fraction of lr
    max_steps: int | None = None  # stop after this many optimizer steps
    max_epochs: float | None = None  # stop after this many passes over the training text
    time_budget: float | None = None  # stop after this many seconds of training (flag: 90s, 10m, 1h)
    eval_every: int = 200  # evaluate on the validation split every this many steps
    log_every: int = 10  # report progress (and sync with the device) every this many steps
    seed: int = 1337  # seeds initialisation and dropout
    device: str = "auto"  # auto, cpu, cuda or mps
    dtype: str = "fp32"  # fp32, or bf16 autocast (fp32 master weights)
    compile: bool = False  # torch.compile the training module (meant for CUDA)
    scheduled_sampling: str = "none"  # none, or the decay of the teacher-forcing probability: linear, exponential, inverse-sigmoid
    ss_k: float | None = None  # the schedule's parameter k (None: the schedule's default; see charlm/training/scheduled.py)
    ss_floor: float = 0.5  # the teacher-forcing probability never falls below this (1 = plain training)
    ss_mode: str = "model"  # what replaces a true input: a sample of the model's prediction, or a uniform random symbol


SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def all_keys() -> list[str]:
    return [k for cls in SECTIONS.values() for k in field_names(cls) if k != "vocab_size"]


def parse_duration(value: str | float | int | None) -> float | None:
    """'90s', '10m', '1.5h', '600' -> seconds."""
    if isinstance(value, bool):
        raise OptionError(f"cannot read the duration {value!r}: use a number of seconds or e.g. 90s, 10m, 1h")
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(value))
    if not m:
        raise OptionError(f"cannot read the duration {value!r}: use a number of seconds or e.g. 90s, 10m, 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("charlm.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    if name not in list_presets():
        raise OptionError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    text = resources.files("charlm.presets").joinpath(f"{name}.yaml").read_text()
    return _check_keys(yaml.safe_load(text) or {}, f"preset {name}")


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise OptionError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise OptionError(f"config file {path} is a directory; give a YAML file") from None
    except UnicodeDecodeError as e:
        raise OptionError(f"config file {path} is not UTF-8 text (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        raise OptionError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise OptionError(f"config file {path} is nested too deeply: it must be a flat mapping of option: value") from None
    return _check_keys(data or {}, f"config file {path}")


def _check_keys(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise OptionError(f"{where} must be a mapping of option: value")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise OptionError(f"{where}: option names must be text, got {odd[0]!r}; valid keys: {', '.join(all_keys())}")
    nested = [k for k, v in data.items() if isinstance(v, (dict, list))]
    if nested:
        raise OptionError(f"{where}: option {nested[0]} must be a single value, not a {type(data[nested[0]]).__name__}")
    unknown = sorted(set(data) - set(all_keys()))
    if unknown:
        raise OptionError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(all_keys())}")
    return dict(data)


def resolve(*layers: dict[str, Any], base: dict[str, dict] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Merge flat option layers (later wins; None means 'not given') over defaults or a saved config."""
    merged: dict[str, Any] = {}
    if base:
        if not all(isinstance(section, dict) for section in base.values()):
            raise OptionError("a saved config section is not a mapping of option: value")
        for section in base.values():
            merged.update(section)
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    merged["time_budget"] = parse_duration(merged.get("time_budget"))
    model = _build(ModelConfig, merged)
    train = _build(TrainConfig, merged)
    validate(model, train)
    return model, train


def _build(cls, merged: dict[str, Any]):
    kwargs = {}
    for f in fields(cls):
        if f.name in merged:
            kwargs[f.name] = _coerce(f, merged[f.name])
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = str(f.type)
    try:
        if value is None:
            if kind.endswith("None"):
                return None
            raise ValueError
        if isinstance(value, (list, dict, tuple, set)):
            raise ValueError
        if isinstance(value, bool) and not kind.startswith("bool"):
            raise ValueError  # YAML reads yes/no/on/off as booleans: never a number
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):  # from YAML or a checkpoint: a real bool (or its spelling)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise OptionError(f"option {f.name} expects {kind.split(' ')[0]}, got {shown}") from None


def validate(model: ModelConfig, train: TrainConfig) -> None:
    """Reject values that cannot work, with the option's name in the message.

    Flags, presets, --config files and the configs read from checkpoints all come through here.
    """
    for cfg in (model, train):
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise OptionError(f"{f.name} must be a finite number (got {value})")
    checks = [
        (model.cell in cell_names(), f"cell must be one of {', '.join(cell_names())} (got {model.cell!r})"),
        (1 <= model.num_layers <= MAX_LAYERS, f"num_layers must be between 1 and {MAX_LAYERS} (got {model.num_layers})"),
        (1 <= model.rnn_size <= MAX_WIDTH, f"rnn_size must be between 1 and {MAX_WIDTH} (got {model.rnn_size})"),
        (1 <= model.embed_size <= MAX_WIDTH, f"embed_size must be between 1 and {MAX_WIDTH} (got {model.embed_size})"),
        (0 <= model.vocab_size <= MAX_VOCAB, f"vocab_size must be between 1 and {MAX_VOCAB} (got {model.vocab_size})"),
        (0 <= model.dropout < 1, "dropout must be in [0, 1)"),
        (-100 <= model.forget_bias <= 100, f"forget_bias must be between -100 and 100 (got {model.forget_bias})"),
        (1 <= train.batch_size <= MAX_STREAMS, f"batch_size must be between 1 and {MAX_STREAMS} (got {train.batch_size})"),
        (1 <= train.seq_length <= MAX_STREAMS, f"seq_length must be between 1 and {MAX_STREAMS} (got {train.seq_length})"),
        (train.lr > 0, "lr must be positive"),
        (train.weight_decay >= 0, "weight_decay must be >= 0"),
        (train.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
        (train.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)} (got {train.schedule!r})"),
        (0 <= train.warmup_steps <= MAX_COUNT, f"warmup_steps must be between 0 and 2^63-1 (got {train.warmup_steps})"),
        (0 < train.lr_decay <= 1, "lr_decay must be in (0, 1]"),
        (1 <= train.decay_every <= MAX_COUNT, f"decay_every must be between 1 and 2^63-1 (got {train.decay_every})"),
        (0 <= train.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
        (train.max_steps is None or 1 <= train.max_steps <= MAX_COUNT, f"max_steps must be between 1 and 2^63-1 (got {train.max_steps})"),
        (train.max_epochs is None or train.max_epochs > 0, "max_epochs must be positive"),
        (train.time_budget is None or train.time_budget > 0, "time_budget must be positive"),
        (1 <= train.eval_every <= MAX_COUNT, f"eval_every must be between 1 and 2^63-1 (got {train.eval_every})"),
        (1 <= train.log_every <= MAX_COUNT, f"log_every must be between 1 and 2^63-1 (got {train.log_every})"),
        (0 <= train.seed <= MAX_COUNT, f"seed must be between 0 and 2^63-1 = {MAX_COUNT} (got {train.seed})"),
        (train.device in DEVICES, f"device must be one of {', '.join(DEVICES)} (got {train.device!r})"),
        (train.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)} (got {train.dtype!r})"),
    ]
    for ok, message in checks + _ss_checks(train):
        if not ok:
            raise OptionError(message)
    parameters = num_parameters(model)
    if parameters > MAX_PARAMETERS:
        raise OptionError(
            f"the model would have {parameters:,} parameters; at most 2^31 = {MAX_PARAMETERS:,} are allowed "
            f"(lower rnn_size, num_layers or embed_size)"
        )


def _ss_checks(train: TrainConfig) -> list[tuple[bool, str]]:
    """Scheduled sampling's options; ss_k's range depends on the schedule (charlm/training/scheduled.py)."""
    k, name = train.ss_k, train.scheduled_sampling
    ranges = {"linear": (k is None or k >= 1, "linear: the steps over which it falls from 1 to 0, >= 1"),
              "exponential": (k is None or 0 < k < 1, "exponential: the factor per step, in (0, 1)"),
              "inverse-sigmoid": (k is None or k >= 1, "inverse-sigmoid: >= 1")}
    ok, need = ranges.get(name, (True, ""))
    return [
        (name in SS_SCHEDULES, f"scheduled_sampling must be one of {', '.join(SS_SCHEDULES)} (got {name!r})"),
        (train.ss_mode in SS_MODES, f"ss_mode must be one of {', '.join(SS_MODES)} (got {train.ss_mode!r})"),
        (0 <= train.ss_floor <= 1, f"ss_floor must be in [0, 1]: the lowest teacher-forcing probability (got {train.ss_floor})"),
        (k is None or k > 0, f"ss_k must be positive (got {k})"),
        (ok, f"ss_k for {need} (got {k})"),
    ]


def num_parameters(model: ModelConfig) -> int:
    """The parameters of the network this config describes, for any registered cell (nothing allocated)."""
    from charlm.model import parameter_shapes  # here: model imports this module

    return sum(math.prod(shape) for shape in parameter_shapes(model).values())


def from_record(model: Any, train: Any, where: str) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs a checkpoint records, through the same checks as flags.

    Unknown model options are refused (this charlm could not build that model); unknown training
    options are ignored (they change nothing about the weights).
    """
    for name, section in (("model", model), ("train", train)):
        if not isinstance(section, dict):
            raise OptionError(f"{where}: the recorded {name} config is not a mapping")
    unknown = sorted(set(model) - set(field_names(ModelConfig)))
    if unknown:
        raise OptionError(f"{where}: unknown model option(s) {', '.join(map(repr, unknown))[:200]}; "
                          "written by a newer charlm, or corrupt")
    known_train = {k: v for k, v in train.items() if k in field_names(TrainConfig)}
    try:
        model_cfg, train_cfg = resolve(base={"model": model, "train": known_train})
    except CharlmError as e:
        raise OptionError(f"{where}: the recorded config is invalid: {e}") from None
    if model_cfg.vocab_size < 1:
        raise OptionError(f"{where}: the recorded config is invalid: vocab_size must be between 1 and {MAX_VOCAB} "
                          f"(got {model_cfg.vocab_size})")
    return model_cfg, train_cfg


def as_dict(model: ModelConfig, train: TrainConfig) -> dict[str, dict]:
    return {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
