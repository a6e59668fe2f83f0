"""Dynamic evaluation on the command line: the options of `eval --dynamic` and `sample --adapt FILE`,
and the static-and-dynamic report (the work itself: LanguageModel.score(dynamic=True) and adapted())."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from typing_extensions import Annotated

from charlm.cli.app import err, read_text_file
from charlm.decoding.options import DYN_DEFAULTS, check_dynamic_options
from charlm.errors import CharlmError, DataError, OptionError
from charlm.jsonsafe import strict_json
from charlm.terminal import shown

if TYPE_CHECKING:
    from charlm.api import LanguageModel, Score

DynamicOpt = Annotated[
    bool,
    typer.Option(
        "--dynamic",
        help="Also score with dynamic evaluation: after each window is scored the model takes a gradient step on it (a copy in memory; the checkpoint is never written). Static and dynamic figures side by side.",
    ),
]
DynLrOpt = Annotated[
    Optional[float],
    typer.Option(
        help=f"Dynamic evaluation's learning rate (default: {DYN_DEFAULTS['rms'][0]} for the RMS-normalised update, {DYN_DEFAULTS['sgd'][0]} for SGD; 0 = static).",
        show_default=False,
    ),
]
DynDecayOpt = Annotated[
    Optional[float],
    typer.Option(
        help=f"Pull back toward the trained weights per window, in [0, 1] (default: {DYN_DEFAULTS['rms'][1]} RMS, {DYN_DEFAULTS['sgd'][1]} SGD).",
        show_default=False,
    ),
]
DynUpdateOpt = Annotated[
    str,
    typer.Option(
        help="auto: RMS-normalised with the training gradient statistics when the checkpoint holds them (last.safetensors), else plain SGD; rms; sgd."
    ),
]
DynWindowOpt = Annotated[
    Optional[int],
    typer.Option(help="Characters (tokens) per adaptation step (default: the checkpoint's training window).", show_default=False),
]

check_options = check_dynamic_options


def check_dtype(dtype: str) -> None:
    if dtype != "fp32":
        raise OptionError(f"dynamic evaluation runs in fp32 (it takes gradient steps); leave out --dtype {dtype}")


def eval_report(checkpoints: list[Path], static: Score, adapting: Score, source: str, combine: str, as_json: bool) -> None:
    """Static figures first (the weights as trained), then dynamic ones (the same weights, adapting), side by side."""
    settings = adapting.dynamic or {}
    note = settings.get("note")
    if note:
        err.print(f"note: {note}", soft_wrap=True, markup=False, highlight=False)
    if as_json:
        payload: dict[str, Any] = {
            "source": source,
            "static": static.figures(speed=True),
            "dynamic": {**adapting.figures(speed=True), **settings},
        }
        if static.members:
            payload["members"] = [
                {"checkpoint": str(p), "static": s.figures(speed=True), "dynamic": d.figures(speed=True)}
                for p, s, d in zip(checkpoints, static.members, adapting.members)
            ]
            payload["combine"] = combine
        print(strict_json(payload))
        return
    from rich.table import Table
    from rich.text import Text

    from charlm.terminal import PipeConsole

    rule = "RMS-normalised" if settings["update"] == "rms" else "SGD"
    table = Table(
        "model",
        "static bits/char",
        "dynamic bits/char",
        "change",
        "chars",
        "static chars/s",
        "dynamic chars/s",
        title=f"charlm eval on {source}: static and dynamic ({rule}, lr {settings['lr']:g}, decay {settings['decay']:g}, window {settings['window']})",
    )
    name = f"ensemble ({combine}, {len(static.members)} models)" if static.members else shown(checkpoints[0])
    rows = [(shown(p), s, d) for p, s, d in zip(checkpoints, static.members, adapting.members)] + [(name, static, adapting)]
    for label, s, d in rows:
        table.add_row(
            Text(label),
            f"{s.bits_per_char:.4f}",
            f"{d.bits_per_char:.4f}",
            f"{d.bits_per_char - s.bits_per_char:+.4f}",
            f"{s.chars:,}",
            f"{s.chars_per_s:,.0f}",
            f"{d.chars_per_s:,.0f}",
        )
    PipeConsole().print(table)


def read_adapt_text(path: Path) -> str:
    """--adapt FILE: the whole file as UTF-8 text (a leading BOM dropped)."""
    text = read_text_file("--adapt", path, convert_hint=False)
    if not text:
        raise DataError(f"--adapt {path} is empty: nothing to adapt to")
    return text


def adapt(lm: LanguageModel, path: Path, text: str, unknown: str, options: tuple) -> LanguageModel:
    """sample --adapt FILE: the model adapted to the file's text (dynamic evaluation over it), and one line saying how."""
    update, lr, decay, window = options
    try:
        adapted = lm.adapted(text, unknown=unknown, dyn_update=update, dyn_lr=lr, dyn_decay=decay, dyn_window=window)
    except DataError as e:
        if "fewer than 2" in str(e):
            raise DataError(f"--adapt {path} has fewer than 2 symbols the model knows: nothing to adapt to") from None
        raise
    result = adapted.adaptation
    if result is None or result.dynamic is None:
        raise CharlmError("adaptation did not run")  # not reachable: adapted() always records it
    settings = result.dynamic
    note = settings.get("note")
    rule = "RMS-normalised" if settings["update"] == "rms" else ("plain SGD, " + note if note else "SGD")
    err.print(
        f"adapted to {path}: {result.tokens + 1:,} tokens, {result.bits_per_token:.4f} bits/token while reading it "
        f"({rule}; lr {settings['lr']:g}, decay {settings['decay']:g}, window {settings['window']})",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    return adapted
