"""Sigmoid as 1 / (1 + exp(-x)) where a gate is divided by gates, for its relative precision.

onnxruntime's CPU (and WASM) Sigmoid kernel is an approximation accurate in absolute terms only:
sigmoid(-15) comes out as 3.58e-7 instead of 3.06e-7, and 0 below about -17, where torch gives
4e-8. A gate multiplied by a state never notices (an error of 5e-8 in a product). A ratio of gates
does: minLSTM's forget share f / (f + i) with both gates nearly closed becomes another number, and
its log-probs part from charlm's by 4e-4 within a few hundred steps of ordinary text, over the
1e-4 the export promises. Exp is exact to a few ulps in onnxruntime, so the plain formula restores
torch's values there.

Only those Sigmoids are rewritten (read by a Div directly or through one Add): the formula takes
four nodes instead of one, and onnxruntime spends a few microseconds per node, which an LSTM's six
gates would add to every step (15% of a 2x512 LSTM's step at batch 1, measured).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def ratio_sigmoids(graph: onnx.GraphProto) -> set[str]:
    """The names of Sigmoid nodes whose output reaches a Div, directly or through one Add."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = set()
    for node in graph.node:
        if node.op_type != "Sigmoid":
            continue
        first = readers.get(node.output[0], [])
        second = [r for a in first if a.op_type == "Add" for r in readers.get(a.output[0], [])]
        if any(r.op_type == "Div" for r in first + second):
            found.add(node.name or node.output[0])
    return found


def exact_sigmoid(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite the ratio Sigmoids of the main graph as Reciprocal(1 + Exp(-x)), in place; returns the model."""
    graph = model.graph
    targets = ratio_sigmoids(graph)
    if not targets:
        return model
    one = "charlm_sigmoid_one"
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), one))
    nodes = []
    for k, node in enumerate(graph.node):
        if node.op_type != "Sigmoid" or (node.name or node.output[0]) not in targets:
            nodes.append(node)
            continue
        x, y, tag = node.input[0], node.output[0], f"charlm_sigmoid_{k}"
        nodes += [
            helper.make_node("Neg", [x], [tag + "_neg"], name=tag + "_neg"),
            helper.make_node("Exp", [tag + "_neg"], [tag + "_exp"], name=tag + "_exp"),
            helper.make_node("Add", [tag + "_exp", one], [tag + "_den"], name=tag + "_add"),
            helper.make_node("Reciprocal", [tag + "_den"], [y], name=tag + "_rcp"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model
