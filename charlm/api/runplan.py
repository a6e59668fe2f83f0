"""What a training run resolves to before any data is read (`plan`): its configuration from the
defaults, a preset, a config file and the options, over a resumed checkpoint's; its checkpoints,
input and run dir; and how its text is prepared. `charlm.train` runs a plan; `charlm train --nproc`
makes one, prepares its data once, then starts the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from charlm import config as configs
from charlm.api.progress import Sink, prepare_reporter
from charlm.errors import DataError, OptionError

if TYPE_CHECKING:
    from charlm import checkpoint
    from charlm.tokenizers.spm import TokenizerSpec

__all__ = ["DEFAULT_SPLIT", "FIXED_ON_RESUME", "RunPlan", "plan", "split_fractions", "tokenizer_spec"]

DEFAULT_SPLIT = (0.9, 0.05, 0.05)  # train, val, test fractions of a text

# Fixed by a checkpoint: the model's shape, and the seed (the random stream continues from the saved
# state, so another seed would be silently ignored). Every other option may change on resume: the
# limits, the learning-rate schedule, clipping, eval/log cadence, device, dtype, dropout, and even
# batch size and window (the carried state then restarts from zero, at the same point of the epoch).
FIXED_ON_RESUME = ("cell", "num_layers", "rnn_size", "embed_size", "forget_bias", "seed")
FINETUNE_WARMUP = 100  # --init-from's default warm-up steps (a preset, config file or flag that sets warmup_steps wins)


@dataclass
class RunPlan:
    """What a training run resolved to before any data is read: configs, checkpoints, input, run dir."""

    model_cfg: configs.ModelConfig
    train_cfg: configs.TrainConfig
    resumed: checkpoint.Checkpoint | None
    init: checkpoint.Checkpoint | None
    input: str
    out: Path

    def prepare_data(
        self,
        *,
        encoding: str = "utf-8",
        split: str | Sequence[float] = DEFAULT_SPLIT,
        tokenizer: str | None = None,
        vocab_size: int | None = None,
        character_coverage: float | None = None,
        glob: str | None = None,
        mirror: str | Path | None = None,
        progress: Sink | None = None,
    ) -> Path:
        """The prepared dir to train on: the input itself, or prepared from it once into the cache and reused."""
        from charlm.data import prepare as prep

        spec = tokenizer_spec(tokenizer, vocab_size, character_coverage)
        fractions = split_fractions(split)
        mirror_dir = None if mirror is None else str(mirror)
        files = None
        if not (Path(self.input).is_dir() and (Path(self.input) / "meta.json").exists()):
            files = prep.resolve_inputs(
                self.input, glob=glob, mirror=mirror_dir
            )  # once: a corpus name is fetched and verified here
        return prep.cached_prepare(
            self.input,
            encoding=encoding,
            fractions=fractions,
            mirror=mirror_dir,
            glob=glob,
            tokenizer=spec,
            files=files,
            progress=prepare_reporter(progress),
            base_vocab=self.base_vocab(),
        )

    def base_vocab(self) -> Any:
        """The vocabulary a text is prepared against: a fine-tuning run's starting checkpoint's (new characters are
        appended to it, charlm/training/grow.py), or a resumed fine-tuned run's own; None: the text's own."""
        if self.init is not None:
            return self.init.vocab
        if self.resumed is not None and (self.resumed.meta.get("provenance") or {}).get("fine_tuned_from"):
            return self.resumed.vocab
        return None

    def claim(self, overwrite: bool = False) -> None:
        """Make the run dir ready: another run's files are refused unless resuming it or told to overwrite them."""
        from charlm.training import rundir

        rundir.claim(self.out, resuming=self.resumed is not None, overwrite=overwrite)


def plan(
    input: str | Path | None = None,
    out: str | Path | None = None,
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
    **options: Any,
) -> RunPlan:
    """Resolve a run without reading any data: defaults < preset < config file < options, over a resumed
    checkpoint's configuration or an init_from's model; every option is checked here. Options given as None are not given."""
    from charlm import checkpoint
    from charlm.devices import check_dtype, pick_device

    configs.check_options(options, "charlm.train")
    layers = [configs.load_preset(preset)] if preset else []
    if config:
        layers.append(configs.load_config_file(Path(config)))
    layers.append(options)
    out = None if out is None else Path(out)
    resume_path = _resume_target(resume, out)
    resumed = checkpoint.load(resume_path) if resume_path else None
    init = checkpoint.load(Path(init_from)) if init_from else None
    if resumed is not None and init is not None:
        if resume != "auto":
            raise OptionError("give --resume (continue a run) or --init-from (a new run from its weights), not both")
        init = None  # --resume auto found the run's last checkpoint: it began from --init-from, and continues now
    if init is not None and all(layer.get("warmup_steps") is None for layer in layers):
        layers.insert(0, {"warmup_steps": FINETUNE_WARMUP})  # a fresh optimizer on trained weights: ease in
    if resumed is not None:
        model_cfg, train_cfg = _resume_config(resumed, layers)
        input = input or _recorded_data(resumed)
        out = out or resumed.path.parent
    else:
        if input is None:
            raise OptionError("give a text file, prepared dir or corpus name to train on (or --resume CKPT)")
        base = {"model": init.meta["model"]} if init is not None else None
        model_cfg, train_cfg = configs.resolve(*layers, base=base)
        out = out or Path("checkpoints") / _run_name(str(input))
    check_dtype(pick_device(train_cfg.device), train_cfg.dtype)  # before any data is fetched or prepared
    return RunPlan(model_cfg, train_cfg, resumed, init, str(input), Path(out))


def _run_name(input: str) -> str:
    p = Path(input)
    stem = p.parent.name if p.name == "input.txt" else (p.name if p.is_dir() else p.stem)
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _resume_target(resume: str | Path | None, out: Path | None) -> Path | None:
    """The checkpoint `resume` names; 'auto': OUT/last.safetensors when it exists, else None (start fresh)."""
    from charlm.training import rundir

    if resume is None or str(resume) != "auto":
        return None if resume is None else Path(resume)
    if out is None:
        raise OptionError("--resume auto continues OUT/last.safetensors: give --out too")
    last = out / rundir.LAST
    return last if last.exists() else None


def _resume_config(resumed: checkpoint.Checkpoint, layers: list[dict]) -> tuple[configs.ModelConfig, configs.TrainConfig]:
    """The checkpoint's configuration with the given options over it; options equal to the checkpoint's are fine."""
    saved = {"model": resumed.meta["model"], "train": resumed.meta["train"]}
    saved_model, saved_train = configs.resolve(base=saved)
    kept = {**vars(saved_model), **vars(saved_train)}
    model_cfg, train_cfg = configs.resolve(*layers, base=saved)
    asked = {**vars(model_cfg), **vars(train_cfg)}
    conflicts = [
        f"--{k.replace('_', '-')} {asked[k]} (the checkpoint has {kept[k]})" for k in FIXED_ON_RESUME if asked[k] != kept[k]
    ]
    if conflicts:
        raise OptionError(
            f"--resume continues the checkpoint's model and random stream, but {'; '.join(conflicts)}: drop "
            f"{'it' if len(conflicts) == 1 else 'them'}, or start a new run from its weights with --init-from"
        )
    return model_cfg, train_cfg


def _recorded_data(ckpt: checkpoint.Checkpoint) -> str:
    """The prepared dir a checkpoint was trained on, when resuming without naming the data.

    The path comes from the file, so it is trusted only as far as it is checked: it must be a
    prepared dir (never a text or a tree to prepare) holding the same source text (sha256).
    """
    from charlm.data import PreparedData

    provenance = ckpt.meta.get("provenance") or {}
    recorded = provenance.get("data_dir")
    retry = f"give the data to continue on: charlm train DATA --resume {ckpt.path}"
    if not isinstance(recorded, str) or not (Path(recorded) / "meta.json").is_file():
        raise DataError(f"{ckpt.path} was trained on {recorded!r}, which is not a prepared data dir here; {retry}")
    if PreparedData(recorded).meta.get("source", {}).get("sha256") != provenance.get("source_sha256"):
        raise DataError(f"{recorded} now holds other data than {ckpt.path} was trained on; {retry}")
    return recorded


# -- how a text is prepared ------------------------------------------------------------------------
def tokenizer_spec(tokenizer: str | None, vocab_size: int | None, coverage: float | None) -> TokenizerSpec | None:
    """The tokenizer options as a spec; None when none was given (a prepared dir keeps its own)."""
    if tokenizer is None and vocab_size is None and coverage is None:
        return None
    from charlm.tokenizers.spm import TokenizerSpec

    return TokenizerSpec(
        tokenizer or "char", vocab_size, TokenizerSpec.character_coverage if coverage is None else coverage
    ).checked()


def split_fractions(split: str | Sequence[float]) -> tuple[float, float, float]:
    """split as 'A,B,C' (the flag) or three numbers, checked."""
    from charlm.data.prepare import check_fractions

    try:
        parts: Any = tuple(float(x) for x in (split.split(",") if isinstance(split, str) else split))
    except (TypeError, ValueError):
        raise DataError(f"--split expects three fractions like 0.9,0.05,0.05 (got {split!r})") from None
    return check_fractions(parts)  # it checks that there are three
