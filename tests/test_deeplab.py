"""Fast layer: km_predict's DeepLabv3+ as a served graph (kappamask.model.deeplab) without
TensorFlow: its padding equals TensorFlow's SYMMETRIC padding, the whole graph runs and
keeps to the served contract, and every operator it uses is one TensorRT's ONNX parser
builds. The comparison with Keras itself is in tests/test_keras_import.py."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from kappamask.bands import NUM_NETWORK_OUTPUTS, MaskClass
from kappamask.errors import InvalidInputError
from kappamask.model import deeplab
from kappamask.tools.keras_import import import_keras

from .conftest import deeplab_in_widths, write_keras_deeplab, write_keras_h5

#: The ONNX operators TensorRT's ONNX parser supports (onnx-tensorrt docs/operators.md,
#: TensorRT 8.4 and later), those a served graph may use, with the parser's restrictions
#: that apply to them checked below: Slice and Squeeze axes and Conv weights must be
#: initializers; Resize modes linear/nearest with half_pixel or asymmetric coordinates.
TENSORRT_OPERATORS = {
    "Abs",
    "Add",
    "ArgMax",
    "Cast",
    "Concat",
    "Conv",
    "Div",
    "Equal",
    "Expand",
    "Gather",
    "GlobalAveragePool",
    "Max",
    "MaxPool",
    "Mul",
    "ReduceMax",
    "Relu",
    "Resize",
    "Round",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Squeeze",
    "Where",
}


def _random_layers(channels: int, seed: int = 0) -> list[deeplab.Folded]:
    """Weights of the layout's shapes, as ``fold`` returns them."""
    rng = np.random.default_rng(seed)
    spec = deeplab.layout(NUM_NETWORK_OUTPUTS)
    layers = []
    for layer, width in zip(spec, deeplab_in_widths(channels), strict=True):
        k = layer.kernel
        if layer.kind == "sep":
            depthwise = rng.normal(0, 0.3, (k, k, width, 1))
            pointwise = rng.normal(0, np.sqrt(2 / width), (1, 1, width, layer.filters))
            layers.append(deeplab.fold(pointwise, None, None, depthwise))
        else:
            kernel = rng.normal(0, np.sqrt(2 / (k * k * width)), (k, k, width, layer.filters))
            layers.append(deeplab.fold(kernel, rng.normal(0, 0.1, layer.filters), None))
    return layers


def test_symmetric_padding_is_tensorflow_s() -> None:
    """SYMMETRIC repeats the edge pixel (numpy's "symmetric"), unlike ONNX's reflect."""
    graph = deeplab._Graph()
    out = graph.symmetric_pad("x", 3, 5)
    graph.nodes.append(helper.make_node("Identity", [out], ["y"]))
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "pad",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            graph.inits,
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    x = np.arange(2 * 3 * 7 * 6, dtype=np.float32).reshape(2, 3, 7, 6)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(y, np.pad(x, ((0, 0), (0, 0), (3, 5), (3, 5)), mode="symmetric"))


@pytest.fixture(scope="module")
def graph() -> onnx.ModelProto:
    return deeplab.build_deeplab(_random_layers(14), 14, {"kappamask.level": "L2A"})


def test_the_graph_runs_and_keeps_the_served_contract(graph: onnx.ModelProto) -> None:
    x = np.random.default_rng(1).uniform(0, 1, (1, 14, 320, 320)).astype(np.float32)
    x[0, :, :40, :40] = 0.0
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    classes, confidence, probability, scores = session.run(None, {"input": x})
    assert classes.shape == confidence.shape == probability.shape == (1, 320, 320)
    assert scores.shape == (1, 4, 320, 320)
    assert (classes[0, :40, :40] == MaskClass.MISSING).all()
    assert (probability[0, :40, :40] == 255).all()
    assert not (classes[0, 40:, 40:] == MaskClass.MISSING).any()  # MISSING only without data
    assert set(np.unique(classes)) <= {int(c) for c in MaskClass} - {MaskClass.UNDEFINED}


def test_every_operator_is_one_tensorrt_builds(graph: onnx.ModelProto) -> None:
    initializers = {i.name for i in graph.graph.initializer}
    used = {node.op_type for node in graph.graph.node}
    assert used <= TENSORRT_OPERATORS, used - TENSORRT_OPERATORS
    for node in graph.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Slice":
            assert node.input[3] in initializers  # axes
        if node.op_type == "Squeeze":
            assert node.input[1] in initializers
        if node.op_type == "Conv":
            assert node.input[1] in initializers
        if node.op_type == "Resize":
            assert attrs["mode"] in (b"linear", b"nearest")
            assert attrs["coordinate_transformation_mode"] in (b"half_pixel", b"asymmetric")


def test_a_file_that_is_not_km_predict_s_deeplab_is_refused(tmp_path: Path) -> None:
    bn = {k: np.ones(32, np.float32) for k in ("gamma", "beta", "moving_mean", "moving_variance")}
    partial = tmp_path / "partial.hdf5"
    write_keras_h5(
        partial,
        {
            "separable_conv2d": {
                "depthwise_kernel": np.zeros((3, 3, 13, 1), np.float32),
                "pointwise_kernel": np.zeros((1, 1, 13, 32), np.float32),
            },
            "batch_normalization": bn,
            "conv2d": {
                "kernel": np.zeros((1, 1, 32, 6), np.float32),
                "bias": np.zeros(6, np.float32),
            },
        },
    )
    with pytest.raises(InvalidInputError, match="km_predict's DeepLabv3\\+ has"):
        import_keras(partial, "L1C", tmp_path / "m.onnx")
    odd = tmp_path / "odd.hdf5"
    write_keras_h5(
        odd,
        {
            "separable_conv2d": {
                "depthwise_kernel": np.zeros((3, 3, 13, 1)),
                "pointwise_kernel": np.zeros((1, 1, 13, 32)),
                "extra": np.zeros(3),
            }
        },
    )
    with pytest.raises(InvalidInputError, match="not a layer of km_predict's DeepLabv3"):
        import_keras(odd, "L1C", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_km_predict_file_imports_whatever_the_layer_order(tmp_path: Path) -> None:
    """Layers are taken in Keras' creation order (their names' numbers), not the file's:
    a file whose layers are listed in another order gives the same graph."""
    weights = write_keras_deeplab(tmp_path / "l1c_deeplabv3plus.hdf5", 13)
    first = import_keras(weights, "L1C", tmp_path / "a.onnx")
    with h5py.File(weights, "r+") as f:
        f.attrs["layer_names"] = list(reversed(list(f.attrs["layer_names"])))
    second = import_keras(weights, "L1C", tmp_path / "b.onnx")
    for a, b in zip(first.graph.initializer, second.graph.initializer, strict=True):
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_the_offset_rule_travels_with_the_model(tmp_path: Path) -> None:
    """An imported model records its offset rule; the installed config declares it, so
    the reader follows the served model without a code change."""
    from kappamask.inference.repository import cpu_config, spec_from_onnx

    weights = write_keras_deeplab(tmp_path / "l2a_deeplabv3plus.hdf5", 14)
    out = tmp_path / "m.onnx"
    import_keras(weights, "L2A", out, offset_rule="km_predict")
    spec = spec_from_onnx(out)
    assert spec.offset_rule == "km_predict" and spec.architecture == "deeplabv3plus"
    assert 'key: "offset_rule" value: { string_value: "km_predict" }' in cpu_config(spec)
    assert spec.provenance()["offset_rule"] == "km_predict"
    with pytest.raises(InvalidInputError, match="offset rule must be one of"):
        import_keras(weights, "L2A", tmp_path / "x.onnx", offset_rule="guess")


def test_the_quantiser_finds_the_layers_it_keeps_in_fp32(tmp_path: Path) -> None:
    """The graph's convolutions carry stable names, by which `kappamask quantize` keeps
    the first convolution and the softmax's (then the decoder, then ASPP) in FP32."""
    from kappamask.tools.quantize import DEEPLAB_FP32_LADDER, _named

    model = import_keras(write_keras_deeplab(tmp_path / "l1c.hdf5", 13), "L1C", tmp_path / "m.onnx")
    names = {i.name for i in model.graph.initializer}
    assert {
        "entry1.weight",
        "middle24.depthwise",
        "exit2.weight",
        "aspp6.bias",
        "decoder3.weight",
        "head.weight",
    } <= names
    kept = [len(_named(model, ladder)) for ladder in DEEPLAB_FP32_LADDER]
    assert kept == [2, 2 + 3, 2 + 3 + 6]
