"""`charlm export --web DIR`: a static folder that generates in the browser with onnxruntime-web.

    DIR/index.html   the page: prime, length, temperature, greedy, seed, backend, Generate
    DIR/app.js       its code: the step loop, charlm's sampling rule and Python's random.Random in JavaScript
    DIR/model.onnx   the step graph (onnx.py), checked like --onnx's
    DIR/model.json   what the page needs to know: vocabulary, state shapes, start ids, a description
    DIR/ort/         onnxruntime-web's files, with --ort-dist (a local copy of the npm package's dist/):
                     then the folder works offline. Without it, the page loads them from the CDN address
                     of the pinned version (ORT_WEB_VERSION).

Browsers do not let a page opened from file:// fetch its model or WebAssembly, so the folder is
served: `python -m http.server -d DIR` (any static server).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from charlm.errors import OptionError
from charlm.export.onnx import MODEL_FILE, StepGraph, write_atomic

ORT_WEB_VERSION = "1.31.1"  # the onnxruntime-web release the page is tested with (tests/test_export_browser.py)
CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
# The bundle with the WASM and WebGPU (JSEP) backends, and the WebAssembly it loads.
ORT_FILES = ("ort.min.js", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")
PAGE_FILES = ("index.html", "app.js")
NPM_HINT = (
    f"npm install --prefix .cache/npm --no-save --ignore-scripts onnxruntime-web@{ORT_WEB_VERSION}, "
    "then --ort-dist .cache/npm/node_modules/onnxruntime-web/dist"
)


@dataclass
class WebExport:
    """What export_web wrote."""

    graph: StepGraph
    files: list[Path] = field(default_factory=list)
    ort_source: str = ""  # "ort/" (local copy) or the CDN address


def find_dist(ort_dist: str | Path) -> Path:
    """The folder holding ORT_FILES: --ort-dist itself, or its dist/ (the npm package's root given)."""
    path = Path(ort_dist).expanduser()
    for candidate in (path, path / "dist"):
        if all((candidate / name).is_file() for name in ORT_FILES):
            return candidate
    missing = [n for n in ORT_FILES if not (path / n).is_file()]
    raise OptionError(f"--ort-dist {path} lacks onnxruntime-web's {', '.join(missing)}; install it with: {NPM_HINT}")


def page_data(graph: StepGraph) -> dict:
    """model.json: the tokenizer (without the SentencePiece model: the page cannot encode with it), states, a description."""
    meta = graph.metadata
    members = json.loads(meta["charlm.members"])
    tokenizer = {k: v for k, v in graph.tokenizer.items() if k != "model"}
    describe = ", ".join(f"{m['model']['cell']} {m['model']['num_layers']}x{m['model']['rnn_size']}" for m in members)
    return {
        "format": meta["charlm.format"],
        "charlm_version": meta["charlm.version"],
        "dtype": graph.dtype,
        "tokenizer": tokenizer,
        "states": [s.record() for s in graph.states],
        "vocab_size": graph.tokenizer["size"],
        "description": describe
        if len(members) == 1
        else f"ensemble ({json.loads(meta['charlm.ensemble'])['combine']}) of {describe}",
        "metrics": [m.get("metrics", {}) for m in members],
        "check": json.loads(meta["charlm.check"]),
    }


def write_web(graph: StepGraph, out_dir: str | Path, ort_dist: str | Path | None = None) -> WebExport:
    """Write the page folder for a built graph (see the module docstring)."""
    out = Path(out_dir)
    dist = find_dist(ort_dist) if ort_dist is not None else None  # checked before anything is written
    source = "ort/" if dist is not None else CDN
    result = WebExport(graph, ort_source=source)
    result.files.append(write_atomic(out / MODEL_FILE, graph.model.SerializeToString()))
    data = json.dumps(page_data(graph), ensure_ascii=False, separators=(",", ":"))
    result.files.append(write_atomic(out / "model.json", data.encode("utf-8")))
    page = resources.files(__package__).joinpath("page")
    for name in PAGE_FILES:
        text = page.joinpath(name).read_text(encoding="utf-8")
        text = text.replace("__ORT_BASE__", source).replace("__ORT_VERSION__", ORT_WEB_VERSION)
        result.files.append(write_atomic(out / name, text.encode("utf-8")))
    if dist is not None:
        (out / "ort").mkdir(exist_ok=True)
        for name in ORT_FILES:
            shutil.copyfile(dist / name, out / "ort" / name)
            result.files.append(out / "ort" / name)
    return result
