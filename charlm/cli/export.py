"""`charlm export`: a model as an ONNX step graph with a torch-free generator, and as a page that generates in a browser.

Parse, call charlm.export, report on stderr. Nothing heavy (torch, onnx) is imported until the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from charlm.cli.app import app, err, friendly
from charlm.cli.decode import CkptArg, CombineOpt, WeightsOpt, parse_weights
from charlm.decoding.options import COMBINE_RULES
from charlm.errors import OptionError

EXPORT_DTYPES = ("fp32", "fp16", "int8")  # charlm.export.storage.STORAGE_DTYPES, named here without importing it

OnnxOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--onnx",
        metavar="DIR",
        show_default=False,
        help="Write DIR/model.onnx (one step: ids and state in, log-probs and state out) and DIR/generate.py, "
        "which needs only numpy and onnxruntime.",
    ),
]
WebOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--web",
        metavar="DIR",
        show_default=False,
        help="Write a static page (index.html, app.js, model.onnx, model.json) that generates in the browser "
        "with onnxruntime-web; serve it, e.g. python -m http.server -d DIR.",
    ),
]
ExportDtypeOpt = Annotated[
    str,
    typer.Option(
        help="How the weights are stored: fp32; fp16 (half the file) or int8 (a quarter, one "
        "scale per row). The arithmetic is fp32 in all three (docs/export.md)."
    ),
]
OrtDistOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--ort-dist",
        metavar="PATH",
        show_default=False,
        help="A local copy of the onnxruntime-web npm package's dist/ to copy into the page (offline); "
        "without it the page loads onnxruntime-web from its CDN.",
    ),
]


@app.command()
@friendly
def export(
    checkpoints: CkptArg,
    onnx: OnnxOpt = None,
    web: WebOpt = None,
    dtype: ExportDtypeOpt = "fp32",
    ort_dist: OrtDistOpt = None,
    weights: WeightsOpt = None,
    combine: CombineOpt = "mean",
):
    """Export for use without PyTorch: an ONNX step graph and a generator (--onnx), a browser page (--web).

    Several checkpoints make one graph that combines them (an ensemble). Checked against charlm before anything is written.
    """
    if onnx is None and web is None:
        raise OptionError("say where to export: --onnx DIR, --web DIR, or both")
    if dtype not in EXPORT_DTYPES:
        raise OptionError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)} (got {dtype!r})")
    if combine not in COMBINE_RULES:
        raise OptionError(f"--combine must be one of {', '.join(COMBINE_RULES)} (got {combine!r})")
    try:
        from charlm.export import export as run_export
    except ImportError as e:
        raise OptionError(
            f"charlm export needs onnx, onnxscript and onnxruntime ({e.name} is missing): pip install 'charlm[export]'"
        ) from None

    result = run_export(
        checkpoints, onnx=onnx, web=web, dtype=dtype, weights=parse_weights(weights), combine=combine, ort_dist=ort_dist
    )
    check = result.graph.check
    err.print(
        f"checked: onnxruntime's log-probs within {check.max_abs_diff:.2g} of charlm's, mean KL {check.mean_kl:.1g} nats "
        f"({dtype} weights; allowed {check.bound:g} and {check.kl_bound:g}) over {check.steps} steps x {check.streams} streams",
        soft_wrap=True,
    )
    for path in result.onnx_files + result.web_files:
        if path.name in ("model.onnx", "generate.py", "index.html"):
            err.print(f"wrote {path} ({_size(path.stat().st_size)})", soft_wrap=True)
    if onnx is not None:
        err.print(
            f"generate without PyTorch (pip install numpy onnxruntime): python {onnx / 'generate.py'} --length 300",
            soft_wrap=True,
        )
    if web is not None:
        where = (
            "onnxruntime-web copied into the folder: works offline"
            if result.ort_source == "ort/"
            else f"onnxruntime-web from {result.ort_source}"
        )
        err.print(
            f"serve the page ({where}): python -m http.server -b 127.0.0.1 -d {web}, then open http://127.0.0.1:8000/",
            soft_wrap=True,
        )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
