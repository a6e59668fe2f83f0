"""Typed configuration: defaults < preset < --config file < explicit flags.

Each option is declared once, as a field of ModelConfig or TrainConfig made by `option(...)`
(charlm/options.py): its type, default, help and accepted values. The rest is derived from that declaration: the checks in
`validate` (flags, presets, YAML files, the API's keywords and checkpoints alike), the YAML keys
(`all_keys`), the `charlm train` flags (cli/train.py, from `declared_options`) and the keyword check
of `charlm.train(**options)` (`check_options`).

Nothing heavy is imported here: the CLI reads these declarations to build `charlm train --help`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from charlm.cells import BUILTIN_CELLS
from charlm.errors import CharlmError, OptionError
from charlm.options import MAX_COUNT, Check, Declared, at_least, between, interval, one_of, option, positive

SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("fp32", "bf16")  # the precisions a window runs in: training, and whole-window scoring (eval)
TRAIN_DTYPES = (*DTYPES, "auto")  # auto: the fastest of them this machine runs well (charlm/devices.py)
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


def _registered_cells() -> tuple[str, ...]:
    from charlm.cells import cell_names  # the registry imports torch: only when a config is checked

    return cell_names()


# -- the options ----------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    cell: str = option("lstm", "Recurrent cell: {choices} (see charlm/cells/)", one_of(BUILTIN_CELLS, _registered_cells))
    num_layers: int = option(2, "Recurrent layers", between(1, MAX_LAYERS))
    rnn_size: int = option(256, "Hidden units per layer", between(1, MAX_WIDTH))
    embed_size: int = option(64, "Character embedding width fed to the first layer", between(1, MAX_WIDTH))
    dropout: float = option(0.0, "Dropout between layers and before the head; 0 disables", interval("[0, 1)"))
    # measured: docs/results.md
    forget_bias: float = option(
        0.0, "LSTM family (lstm, peephole, minlstm): the forget gate's initial bias; other cells ignore it", between(-100, 100)
    )
    # 0 until the data is known; the message names the range a model needs
    vocab_size: int = option(
        0, "Set from the prepared data", Check(lambda v: 0 <= v <= MAX_VOCAB, f"between 1 and {MAX_VOCAB}"), internal=True
    )


@dataclass
class TrainConfig:
    batch_size: int = option(
        64, "Contiguous streams B the training text is cut into (per process with --nproc)", between(1, MAX_STREAMS)
    )
    seq_length: int = option(100, "Window length T: steps of backpropagation through time", between(1, MAX_STREAMS))
    lr: float = option(2e-3, "Peak learning rate (AdamW)", positive())
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", at_least(0))
    grad_clip: float = option(5.0, "Clip the global gradient norm to this; 0 disables", at_least(0, " (0 disables clipping)"))
    schedule: str = option(
        "constant", "Learning-rate schedule: {choices} (step: times lr-decay every decay-every steps)", one_of(SCHEDULES)
    )
    warmup_steps: int = option(0, "Linear warm-up from 0 to lr over this many steps", between(0, MAX_COUNT))
    # fine-tuning (--init-from): charlm/training/grow.py
    freeze_layers: int = option(
        0,
        "Fine-tuning: hold the embedding and the lowest K recurrent layers fixed for the first "
        "--freeze-steps steps (the new characters' output rows and the upper layers learn first)",
        between(0, MAX_LAYERS),
    )
    freeze_steps: int = option(0, "Fine-tuning: the steps --freeze-layers holds", between(0, MAX_COUNT))
    lr_decay: float = option(0.5, "step schedule: multiply the lr by this", interval("(0, 1]"))
    decay_every: int = option(1000, "step schedule: every this many steps", between(1, MAX_COUNT))
    min_lr_ratio: float = option(0.1, "cosine schedule: the final lr as a fraction of lr", interval("[0, 1]"))
    max_steps: int | None = option(None, "Stop after this many optimizer steps", between(1, MAX_COUNT))
    max_epochs: float | None = option(None, "Stop after this many passes over the training split", positive())
    time_budget: float | None = option(
        None, "Stop after this long: 90s, 10m, 1h. No limit at all: one epoch", positive(), flag_type=str
    )
    eval_every: int = option(200, "Validate and checkpoint every N steps", between(1, MAX_COUNT))
    log_every: int = option(10, "Report progress (and sync with the device) every N steps", between(1, MAX_COUNT))
    seed: int = option(1337, "Seed for initialisation and dropout", between(0, MAX_COUNT, note=f" = {MAX_COUNT}"))
    device: str = option("auto", "Device: {choices}", one_of(DEVICES))
    dtype: str = option(
        "fp32",
        "Precision: fp32, bf16 (autocast, fp32 master weights) or auto (the fastest this machine runs well)",
        one_of(TRAIN_DTYPES),
    )
    compile: bool = option(
        False, "torch.compile the training module: meant for CUDA; the first steps are slow while it compiles", switch=True
    )
    scheduled_sampling: str = option(
        "none",
        "Feed the model its own predictions with a probability growing over training: {choices} "
        "(the teacher-forcing probability's decay)",
        one_of(SS_SCHEDULES),
    )
    # None: each schedule's own k (DEFAULT_K in charlm/training/scheduled.py); its range depends on the schedule
    ss_k: float | None = option(
        None,
        "The decay's k (default: each schedule's own, see charlm/training/scheduled.py): linear, steps to fall from 1 "
        "to 0; exponential, factor per step in (0, 1); inverse-sigmoid, k/(k+exp(step/k)), >= 1",
        positive(got=True),
    )
    ss_floor: float = option(
        0.5,
        "The lowest teacher-forcing probability, in [0, 1] (1 = plain training)",
        interval("[0, 1]", ": the lowest teacher-forcing probability", got=True),
    )
    ss_mode: str = option(
        "model",
        "What replaces a true input: {choices} (model: a sample of its prediction; uniform: a random symbol)",
        one_of(SS_MODES),
    )


SECTIONS = {"model": ModelConfig, "train": TrainConfig}


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _kind(f: dataclasses.Field) -> str:
    return str(f.type).split(" ")[0]  # "int | None" -> "int" (the annotations are strings: __future__ annotations)


def declared_options() -> list[Declared]:
    """Every option a user sets (vocab_size is not one), in declaration order: model first, then train."""
    return [
        Declared(f.name, section, _TYPES[_kind(f)], str(f.type).endswith("None"), f.default, f.metadata["option"])
        for section, cls in SECTIONS.items()
        for f in fields(cls)
        if not f.metadata["option"].internal
    ]


def field_names(cls: type) -> list[str]:
    """The field names of a config class (ModelConfig or TrainConfig), vocab_size included."""
    return [f.name for f in fields(cls)]


def all_keys() -> list[str]:
    """The option names, as YAML keys, API keywords and (with dashes) flags."""
    return [d.name for d in declared_options()]


def check_options(names: Iterable[str], where: str) -> None:
    """Refuse names that are not options (the keywords of `charlm.train(**options)`), suggesting the nearest."""
    keys = all_keys()
    unknown = [n for n in names if n not in keys]
    if unknown:
        close = difflib.get_close_matches(unknown[0], keys, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise OptionError(f"{where}: unknown option(s) {', '.join(unknown)}{hint}; valid options: {', '.join(keys)}")


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
    """The presets shipped in charlm/presets/ (NAME.yaml), by name."""
    return sorted(p.name[:-5] for p in resources.files("charlm.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A shipped preset as a flat mapping of option: value, its keys checked."""
    if name not in list_presets():
        raise OptionError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    import yaml  # here: 8 ms, and --help needs no YAML

    text = resources.files("charlm.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return _check_keys(yaml.safe_load(text) or {}, f"preset {name}")


def load_config_file(path: Path) -> dict[str, Any]:
    """A --config YAML file as a flat mapping of option: value, its keys checked."""
    import yaml

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

    Flags, presets, --config files, the API's keywords and the configs read from checkpoints all
    come through here; each option's check is the one its field declares.
    """
    for cfg in (model, train):
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise OptionError(f"{f.name} must be a finite number (got {value})")
    for cfg in (model, train):
        for f in fields(cfg):
            value, check = getattr(cfg, f.name), f.metadata["option"].check
            if value is not None and check is not None and not check.ok(value):
                raise OptionError(check.message(f.name, value))
    _check_ss_k(train)
    parameters = num_parameters(model)
    if parameters > MAX_PARAMETERS:
        raise OptionError(
            f"the model would have {parameters:,} parameters; at most 2^31 = {MAX_PARAMETERS:,} are allowed "
            f"(lower rnn_size, num_layers or embed_size)"
        )


def _check_ss_k(train: TrainConfig) -> None:
    """ss_k's range depends on the schedule (charlm/training/scheduled.py): the one check that reads two options."""
    k = train.ss_k
    ranges = {
        "linear": (k is None or k >= 1, "linear: the steps over which it falls from 1 to 0, >= 1"),
        "exponential": (k is None or 0 < k < 1, "exponential: the factor per step, in (0, 1)"),
        "inverse-sigmoid": (k is None or k >= 1, "inverse-sigmoid: >= 1"),
    }
    ok, need = ranges.get(train.scheduled_sampling, (True, ""))
    if not ok:
        raise OptionError(f"ss_k for {need} (got {k})")


def num_parameters(model: ModelConfig) -> int:
    """The parameters of the network this config describes, for any registered cell (nothing allocated)."""
    from charlm.model import parameter_shapes  # here: it imports torch; model.py imports this module only for types

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
        raise OptionError(
            f"{where}: unknown model option(s) {', '.join(map(repr, unknown))[:200]}; written by a newer charlm, or corrupt"
        )
    known_train = {k: v for k, v in train.items() if k in field_names(TrainConfig)}
    try:
        model_cfg, train_cfg = resolve(base={"model": model, "train": known_train})
    except CharlmError as e:
        raise OptionError(f"{where}: the recorded config is invalid: {e}") from None
    if model_cfg.vocab_size < 1:
        raise OptionError(
            f"{where}: the recorded config is invalid: vocab_size must be between 1 and {MAX_VOCAB} (got {model_cfg.vocab_size})"
        )
    return model_cfg, train_cfg


def as_dict(model: ModelConfig, train: TrainConfig) -> dict[str, dict]:
    """Both configs as {"model": {...}, "train": {...}}: what a checkpoint records."""
    return {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
