"""`charlm export --onnx`: the step graph as DIR/model.onnx, checked before it is written, and the
torch-free generator DIR/generate.py beside it.

    lm = charlm.load(*checkpoints, device="cpu", dtype="fp32")
    graph = build(lm, "fp32")            # export (torch.onnx, dynamo), store, check: nothing written yet
    write_onnx(graph, Path("out"))       # out/model.onnx, out/generate.py

The graph (step.py): inputs `ids` (B,) int64 and one (L, B, H) fp32 tensor per state (`h`, `c`;
`m0_h` ... for an ensemble), outputs `logprobs` (B, V) and each state as `<name>_out`; B is dynamic.
The file alone is enough to generate: the vocabulary, the tokenizer, each member's config and
metrics, and charlm's version are in its metadata (`charlm.*` keys, JSON values; docs/export.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import stat
import tempfile
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import onnx
import torch

from charlm import __version__
from charlm.errors import CharlmError, OptionError
from charlm.export.check import CheckResult, compare
from charlm.export.sigmoid import exact_sigmoid
from charlm.export.step import IDS, LOGPROBS, StateSpec, StepModule, state_specs
from charlm.export.storage import STORAGE_DTYPES, compress
from charlm.export.tokenizer import tokenizer_record

if TYPE_CHECKING:
    from charlm.api import LanguageModel

FORMAT = "charlm-onnx-step"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
GENERATOR_FILE = "generate.py"
META_PREFIX = "charlm."
# Provenance fields that name paths on the machine that trained the model: a file meant to be
# shared (on a web page) leaves them out; the corpus checksum and the dates stay.
LOCAL_FIELDS = ("data_dir", "source_paths")


@dataclass
class StepGraph:
    """An exported, stored and checked step graph, in memory until write_onnx."""

    model: onnx.ModelProto
    dtype: str
    states: list[StateSpec]
    tokenizer: dict[str, Any]
    check: CheckResult

    @property
    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.model.metadata_props}


def load_for_export(
    checkpoints: Sequence[str | Path], weights: Sequence[float] | None = None, combine: str = "mean"
) -> LanguageModel:
    """The checkpoints as charlm runs them in fp32 on the CPU: the reference the export is checked against."""
    import charlm

    return charlm.load(*checkpoints, device="cpu", dtype="fp32", weights=weights, combine=combine)


def build(lm: LanguageModel, dtype: str = "fp32", check_steps: int = 200, check_streams: int = 3) -> StepGraph:
    """Export lm's step (one model, or an ensemble combined in the graph), store its weights as
    `dtype`, add the metadata, and check it: ONNX's checker, then onnxruntime against lm's own
    decoder over check_steps steps of check_streams streams. A CharlmError if any of it fails."""
    if dtype not in STORAGE_DTYPES:
        raise OptionError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got {dtype!r})")
    if str(lm.device) != "cpu" or lm.dtype != "fp32":
        raise OptionError("export a model loaded with device='cpu', dtype='fp32' (charlm.export.onnx.load_for_export)")
    models = [m.model for m in lm.members]
    specs = state_specs(models)
    module = StepModule(models, lm.weights, lm.combine).eval()
    model = compress(exact_sigmoid(_to_onnx(module, specs, [m.cfg.cell for m in models])), dtype)
    tokenizer = tokenizer_record(lm.vocab)
    _set_metadata(model, lm, dtype, specs, tokenizer)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise CharlmError(f"the exported graph fails ONNX's checker: {str(e).splitlines()[0]}") from None
    result = compare(model.SerializeToString(), lm, specs, dtype, check_steps, check_streams)
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, META_PREFIX + "check": json.dumps(result.record())}
    )
    return StepGraph(model, dtype, specs, tokenizer, result)


def _to_onnx(module: StepModule, specs: list[StateSpec], cells: list[str]) -> onnx.ModelProto:
    """torch.onnx's exporter (torch.export underneath) with a dynamic batch; its progress lines and warnings kept quiet."""
    batch = torch.export.Dim("batch", min=1)
    B = 2  # an example batch of 1 would let the tracer treat B as the constant 1
    args = (torch.zeros(B, dtype=torch.long), *(torch.zeros(s.layers, B, s.size) for s in specs))
    shapes = ({0: batch}, tuple({1: batch} for _ in specs))
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed", said for every export
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                input_names=[IDS, *(s.input for s in specs)],
                output_names=[LOGPROBS, *(s.output for s in specs)],
                dynamo=True,
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many kinds; any of them means this cell has no ONNX step
        raise CharlmError(f"cell {', '.join(sorted(set(cells)))} cannot be exported as an ONNX step: {_reason(e)}") from None
    finally:
        exporter_log.setLevel(level)
    if program is None:  # only when given a file to write to, which it is not
        raise CharlmError("torch.onnx.export returned no program")
    return program.model_proto


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps what torch.export said in pages of advice."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__


def _set_metadata(model: onnx.ModelProto, lm: LanguageModel, dtype: str, specs: list[StateSpec], tokenizer: dict) -> None:
    members = []
    for info in lm.info:
        record = {k: v for k, v in info.items() if k in ("model", "train", "metrics", "tokenizer")}
        record["provenance"] = {k: v for k, v in info.get("provenance", {}).items() if k not in LOCAL_FIELDS}
        record["file"] = Path(info["path"]).name
        members.append(record)
    count = len(lm.members)
    weights = [1.0 / count] * count if lm.weights is None else [w / sum(lm.weights) for w in lm.weights]
    values = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "version": __version__,
        "dtype": dtype,
        "vocab": json.dumps(lm.vocab.to_meta(), ensure_ascii=False),
        "tokenizer": json.dumps(tokenizer, ensure_ascii=False),
        "states": json.dumps([s.record() for s in specs]),
        "ensemble": json.dumps({"members": count, "combine": lm.combine, "weights": weights}),
        "members": json.dumps(members, ensure_ascii=False),
    }
    onnx.helper.set_model_props(model, {META_PREFIX + k: v for k, v in values.items()})
    model.producer_name, model.producer_version = "charlm", __version__
    model.doc_string = (
        f"charlm {__version__}: one step of a character-level recurrent language model "
        f"({', '.join(m['model']['cell'] for m in members)}); ids (B,) and state -> log-probs (B, V) and state"
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The charlm.* metadata of an exported model file, JSON values decoded (the file alone describes the model)."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            key = p.key[len(META_PREFIX) :]
            try:
                out[key] = json.loads(p.value)
            except json.JSONDecodeError:
                out[key] = p.value
    return out


def write_onnx(graph: StepGraph, out_dir: str | Path) -> list[Path]:
    """DIR/model.onnx and DIR/generate.py (numpy + onnxruntime only), each written atomically. Returns the paths."""
    out = Path(out_dir)
    model_path = write_atomic(out / MODEL_FILE, graph.model.SerializeToString())
    generator = resources.files(__package__).joinpath(GENERATOR_FILE).read_bytes()
    gen_path = write_atomic(out / GENERATOR_FILE, generator, mode=0o755)
    return [model_path, gen_path]


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a model."""
    if path.parent.exists() and not path.parent.is_dir():
        raise OptionError(f"{path.parent} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask & (stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
