"""PRelu as LeakyRelu: the same floats, on small graphs built here and on the bundled models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from inference.operator_rewrite import prelu_as_leaky_relu

_MODELS = Path(__file__).resolve().parents[1] / "inference" / "models"


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _ops(model: bytes) -> list[str]:
    return [node.op_type for node in onnx.load_model_from_string(model).graph.node]


def _graph(ir_version: int = 8) -> bytes:
    """x -> PRelu(scalar initializer) -> PRelu(scalar Constant) -> PRelu(per-channel) -> y, and
    the per-channel slope also feeds an Add: three activations of which two can be rewritten."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    scalar = numpy_helper.from_array(np.array([[[0.1234567]]], np.float32), "scalar")
    negative = np.array([[[-0.37]]], np.float32)
    channels = numpy_helper.from_array(np.array([0.1, -0.2, 0.3], np.float32).reshape(3, 1, 1), "channels")
    nodes = [
        helper.make_node("PRelu", ["x", "scalar"], ["a"], name="one"),
        helper.make_node("Constant", [], ["negative"], value=numpy_helper.from_array(negative)),
        helper.make_node("PRelu", ["a", "negative"], ["b"], name="two"),
        helper.make_node("PRelu", ["b", "channels"], ["c"], name="three"),
        helper.make_node("Add", ["c", "channels"], ["y"], name="add"),
    ]
    inputs = [x]
    if ir_version < 4:  # old exporters list initializers among the inputs
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                   for name, shape in (("scalar", [1, 1, 1]), ("channels", [3, 1, 1]))]
    graph = helper.make_graph(nodes, "prelus", inputs, [y], initializer=[scalar, channels])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model.SerializeToString()


@pytest.mark.parametrize("ir_version", [8, 3])
def test_scalar_slopes_become_leaky_relu_with_the_same_outputs(ir_version: int) -> None:
    model = _graph(ir_version)
    rewrite = prelu_as_leaky_relu(model)
    assert (rewrite.rewritten, rewrite.kept) == (2, 1)
    assert _ops(rewrite.model) == ["LeakyRelu", "LeakyRelu", "PRelu", "Add"]
    graph = onnx.load_model_from_string(rewrite.model).graph
    # The slopes nobody reads any more are gone; the per-channel one, still read, stays.
    assert [t.name for t in graph.initializer] == ["channels"]
    assert [v.name for v in graph.input] == ["x"] + (["channels"] if ir_version < 4 else [])
    x = np.random.default_rng(0).normal(0.0, 2.0, (1, 3, 4, 4)).astype(np.float32)
    x[0, 0, 0, :2] = (0.0, -0.0)
    before = _session(model).run(None, {"x": x})[0]
    after = _session(rewrite.model).run(None, {"x": x})[0]
    assert np.array_equal(before.view(np.uint32), after.view(np.uint32))  # bit for bit


def test_a_model_without_scalar_prelu_comes_back_as_it_was() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    rewrite = prelu_as_leaky_relu(model)
    assert rewrite.model is model and (rewrite.rewritten, rewrite.kept) == (0, 0)


@pytest.mark.parametrize("card", ["musclenode-lumbar-dixon", "musclenode-lumbar-vertebrae"])
def test_bundled_models_give_the_same_floats_after_the_rewrite(card: str) -> None:
    """Every activation of the bundled UNets is a one-slope PRelu; all become LeakyRelu and the
    class scores of real-sized windows stay identical, bit for bit."""
    model = (_MODELS / f"{card}.onnx").read_bytes()
    rewrite = prelu_as_leaky_relu(model)
    assert rewrite.rewritten > 0 and rewrite.kept == 0
    assert "PRelu" not in _ops(rewrite.model)
    before, after = _session(model), _session(rewrite.model)
    window = json.loads((_MODELS / f"{card}.json").read_text())["window"]
    shape = [2, before.get_inputs()[0].shape[1], *window]
    name = before.get_inputs()[0].name
    x = np.random.default_rng(1).normal(0.0, 1.0, shape).astype(np.float32)
    expected, found = before.run(None, {name: x})[0], after.run(None, {name: x})[0]
    assert np.array_equal(expected.view(np.uint32), found.view(np.uint32))
