"""The model without PyTorch: one generation step as an ONNX graph, a torch-free generator, a browser page.

    from charlm.export import export
    export(["run/best.safetensors"], onnx="out", web="site", dtype="fp16")

- step.py: the step as a torch module (each cell's own equations; an ensemble combined inside);
- onnx.py: torch.onnx export, metadata, the file and generate.py written beside it;
- storage.py: weights stored in fp16 or int8 (smaller files; fp32 arithmetic);
- check.py: onnxruntime against charlm's decoder, before anything is written;
- tokenizer.py: the vocabulary as plain JSON for the generators;
- generate.py: the generator itself (numpy + onnxruntime), copied verbatim beside the model;
- web.py and page/: the static page on onnxruntime-web.

Importing this package imports torch and onnx; the CLI imports it only when `charlm export` runs.
docs/export.md describes the graph, the metadata and the bounds of each dtype.
"""

from __future__ import annotations

from charlm.export.api import ExportResult, export
from charlm.export.onnx import StepGraph, build, load_for_export, read_metadata, write_onnx
from charlm.export.web import ORT_WEB_VERSION, write_web

__all__ = [
    "ExportResult",
    "ORT_WEB_VERSION",
    "StepGraph",
    "build",
    "export",
    "load_for_export",
    "read_metadata",
    "write_onnx",
    "write_web",
]
