"""The exporter's one entry point: checkpoints in, a checked step graph written as an ONNX folder, a web page, or both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from charlm.errors import OptionError
from charlm.export.onnx import StepGraph, build, load_for_export, write_onnx
from charlm.export.storage import STORAGE_DTYPES
from charlm.export.web import find_dist, write_web


@dataclass
class ExportResult:
    """What export() built and wrote: the graph (its check and metadata), and the files of each folder."""

    graph: StepGraph
    onnx_files: list[Path] = field(default_factory=list)
    web_files: list[Path] = field(default_factory=list)
    ort_source: str | None = None  # the web page's onnxruntime-web: "ort/" (copied) or the CDN address


def export(
    checkpoints: Sequence[str | Path],
    *,
    onnx: str | Path | None = None,
    web: str | Path | None = None,
    dtype: str = "fp32",
    weights: Sequence[float] | None = None,
    combine: str = "mean",
    ort_dist: str | Path | None = None,
) -> ExportResult:
    """`charlm export CKPT... --onnx DIR --web DIR`: load the checkpoints (several: an ensemble, combined in
    the graph), export one step to ONNX with weights stored as `dtype`, check it against charlm, then write
    DIR/model.onnx + DIR/generate.py (onnx) and the page folder (web). Nothing is written if a check fails."""
    if onnx is None and web is None:
        raise OptionError("say where to export: --onnx DIR (the model and a torch-free generate.py), --web DIR (a page), or both")
    if dtype not in STORAGE_DTYPES:
        raise OptionError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got {dtype!r})")
    if ort_dist is not None:
        if web is None:
            raise OptionError("--ort-dist goes with --web DIR (it is the page's copy of onnxruntime-web)")
        find_dist(ort_dist)  # before the minutes of work, not after
    graph = build(load_for_export(checkpoints, weights, combine), dtype)
    result = ExportResult(graph)
    if onnx is not None:
        result.onnx_files = write_onnx(graph, onnx)
    if web is not None:
        page = write_web(graph, web, ort_dist)
        result.web_files, result.ort_source = page.files, page.ort_source
    return result
