"""Smaller files: the weight matrices stored in fp16 or int8, turned back into fp32 when a session starts.

Every float matrix of the graph (embedding, recurrent and input weights, head) is replaced by its
fp16 copy, or by int8 values and one fp32 scale per output row (symmetric, as charlm's int8
decoder), followed by the nodes that restore it: Cast (and Mul by the scales). Those nodes read
constants only, so onnxruntime folds them once when it loads the model (graph optimisation, on
by default, also in onnxruntime-web): the arithmetic then runs in fp32 at fp32's speed on every
backend, and only the rounding of the weights differs. What shrinks is the file a browser
downloads: about 1/2 (fp16) and 1/4 (int8) of fp32. Vectors (biases, peepholes) stay fp32: they are
a small share of the bytes.

Why not fp16 arithmetic or integer products (onnxruntime's dynamic quantization)? onnxruntime's
CPU and WASM kernels compute fp16 in few operators and integer products need activation
quantization per step: slower or unavailable per backend, and a second source of error. Weight
storage is what the browser use needs, and it runs everywhere.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

STORAGE_DTYPES = ("fp32", "fp16", "int8")
# What each stored dtype may change, against charlm's fp32 decoder on text the model samples
# (check.py), as (largest |log-prob difference|, mean KL divergence in nats per step). fp32: only
# the order of float operations differs. fp16 rounds each weight by at most 2^-11 of itself, which
# moves a logit by about 2^-11 of the sum of its terms' sizes: measured up to 0.018 on a 2x256 LSTM.
# int8 rounds a weight by up to 1/254 of its row's largest: a rare symbol's log-prob moves by up to
# 0.45 there while the distribution as a whole stays close (mean KL 2e-4 nats, +0.0002 bits/char
# on text). docs/export.md has the measurements.
BOUNDS = {"fp32": (1e-4, 1e-5), "fp16": (0.1, 1e-4), "int8": (1.0, 1e-3)}


def compress(model: onnx.ModelProto, dtype: str) -> onnx.ModelProto:
    """The model with its float matrices stored as `dtype` (fp32: unchanged) and restored by constant nodes."""
    if dtype == "fp32":
        return model
    graph = model.graph
    axes = _output_axes(graph)
    kept, restore = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
            kept.append(init)
            continue
        w = numpy_helper.to_array(init)
        if dtype == "fp16":
            kept.append(numpy_helper.from_array(w.astype(np.float16), init.name + "__fp16"))
            restore.append(helper.make_node("Cast", [init.name + "__fp16"], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            q, scale = quantize_rows(w, axes.get(init.name, 0))
            kept += [numpy_helper.from_array(q, init.name + "__q"), numpy_helper.from_array(scale, init.name + "__scale")]
            restore += [
                helper.make_node("Cast", [init.name + "__q"], [init.name + "__qf"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [init.name + "__qf", init.name + "__scale"], [init.name]),
            ]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(restore + nodes)  # first: a graph's nodes are in topological order
    return model


def quantize_rows(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis` (the output units): w ~ q * scale, |q| <= 127."""
    reduce = 1 - axis
    top = np.abs(w).max(axis=reduce, keepdims=True)
    scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _output_axes(graph: onnx.GraphProto) -> dict[str, int]:
    """For each matrix, the axis that indexes output units, from the node that reads it: a MatMul's
    right operand (in, out) -> 1; a Gemm's B -> 0 with transB, else 1; an embedding (Gather's table) -> 0."""
    axes: dict[str, int] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in axes:
                continue
            if node.op_type == "MatMul" and position == 1:
                axes[name] = 1
            elif node.op_type == "Gemm" and position == 1:
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axes[name] = 0 if trans_b else 1
            elif node.op_type == "Gather" and position == 0:
                axes[name] = 0
    return axes
