"""Build the served ONNX graph straight from numpy weights (no PyTorch, no TensorFlow).

Input ``input`` float32 [N, C, H, W] (normalised features, H and W multiples of 16);
outputs ``classes`` uint8 [N, H, W] with mask codes, ``confidence`` uint8 [N, H, W]
(the winning sigmoid x 255), ``cloud_probability`` uint8 [N, H, W] (percent, 255 where
the input has no data) and ``scores`` uint8 [N, 4, H, W] (CLEAR, CLOUD_SHADOW,
SEMI_TRANSPARENT_CLOUD, CLOUD outputs x 255: what the service blends across overlapping
crops). See ``_add_head`` for how MISSING and UNDEFINED are handled and
``_probability_nodes`` for what the probability is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kappamask.bands import NETWORK_OUTPUT_ORDER, MaskClass
from kappamask.inference.model_spec import (
    INPUT,
    OUTPUT_CLASSES,
    OUTPUT_CONFIDENCE,
    OUTPUT_PROBABILITY,
    OUTPUT_SCORES,
    PROBABILITY_NODATA,
    SCORE_CLASSES,
)
from kappamask.model.architecture import LEVELS, conv_specs

OPSET = 17
INPUT_NAME = INPUT
#: The tensor of the six class scores the head reads (sigmoids of the U-Net, the softmax
#: of DeepLabv3+).
PROBS = "head.conv2.out"

Weights = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _same_pads(kernel: int) -> list[int]:
    # TensorFlow/Keras 'same': the odd pixel of an even kernel goes bottom/right.
    total = kernel - 1
    before = total // 2
    after = total - before
    return [before, before, after, after]


def build_model(
    weights: Weights,
    in_channels: int,
    base_filters: int,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """Assemble the U-Net + argmax/confidence head as an ONNX model."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(name: str, x: str) -> str:
        spec = specs[name]
        kernel, bias = weights[name]
        if kernel.shape != (spec.out_channels, spec.in_channels, spec.kernel, spec.kernel):
            raise ValueError(f"{name}: kernel shape {kernel.shape} does not fit the U-Net")
        inits.append(numpy_helper.from_array(kernel.astype(np.float32), f"{name}.weight"))
        inits.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}.bias"))
        out = f"{name}.out"
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [out + "_pre"],
                kernel_shape=[spec.kernel, spec.kernel],
                pads=_same_pads(spec.kernel),
            )
        )
        op = "Relu" if spec.activation == "relu" else "Sigmoid"
        nodes.append(helper.make_node(op, [out + "_pre"], [out]))
        return out

    head_channels = weights["head.conv1"][0].shape[0]
    specs = {s.name: s for s in conv_specs(in_channels, base_filters, head_channels=head_channels)}
    x = INPUT_NAME
    skips = []
    for level in range(1, LEVELS + 1):
        x = conv(f"enc{level}.conv2", conv(f"enc{level}.conv1", x))
        if level < LEVELS:
            skips.append(x)
            pooled = f"pool{level}"
            nodes.append(
                helper.make_node("MaxPool", [x], [pooled], kernel_shape=[2, 2], strides=[2, 2])
            )
            x = pooled
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales"))
    for level in range(LEVELS - 1, 0, -1):
        up = f"upsample{level}"
        nodes.append(
            helper.make_node(
                "Resize",
                [x, "", "up_scales"],
                [up],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        )
        x = conv(f"up{level}.conv", up)
        cat = f"concat{level}"
        nodes.append(helper.make_node("Concat", [skips[level - 1], x], [cat], axis=1))
        x = conv(f"dec{level}.conv2", conv(f"dec{level}.conv1", cat))
    probs = conv("head.conv2", conv("head.conv1", x))
    assert probs == PROBS
    return finish_model(nodes, inits, in_channels, "kappamask_unet", metadata)


def finish_model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    in_channels: int,
    graph_name: str,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """The served model from a network whose six class scores are the tensor ``PROBS``
    (the U-Net's sigmoids, DeepLabv3+'s softmax): the head, the probability, the inputs
    and outputs every served model has, and the metadata."""
    _add_head(nodes, inits, PROBS)
    _probability_nodes(nodes, inits, PROBS)
    _score_nodes(nodes, inits)
    plane = ["batch", "height", "width"]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, [plane[0], in_channels, *plane[1:]]
            )
        ],
        [
            helper.make_tensor_value_info(OUTPUT_CLASSES, TensorProto.UINT8, plane),
            helper.make_tensor_value_info(OUTPUT_CONFIDENCE, TensorProto.UINT8, plane),
            helper.make_tensor_value_info(OUTPUT_PROBABILITY, TensorProto.UINT8, plane),
            helper.make_tensor_value_info(
                OUTPUT_SCORES, TensorProto.UINT8, [plane[0], len(SCORE_CLASSES), *plane[1:]]
            ),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by the ONNX Runtime and TensorRT versions of 2023 on
    model.producer_name = "kappamask"
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def _add_head(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], probs: str) -> None:
    """Sigmoid outputs -> mask codes and confidence (both uint8).

    MISSING means "no data": it is reported exactly where every input feature is 0 (how
    no-data pixels reach the network), with the MISSING output as confidence. Elsewhere
    the winner is the best of CLEAR .. CLOUD: the MISSING output may not swallow pixels
    that have data (it does on hazy or unfamiliar scenes), and UNDEFINED never wins.
    """
    real = list(NETWORK_OUTPUT_ORDER[1:5])
    assert real == list(SCORE_CLASSES)
    missing_channel = NETWORK_OUTPUT_ORDER.index(MaskClass.MISSING)
    inits += [
        numpy_helper.from_array(np.array([1], np.int64), "head_start"),
        numpy_helper.from_array(np.array([1 + len(real)], np.int64), "head_end"),
        numpy_helper.from_array(np.array([missing_channel], np.int64), "head_missing"),
        numpy_helper.from_array(np.array([missing_channel + 1], np.int64), "head_missing_end"),
        numpy_helper.from_array(np.array([1], np.int64), "head_axis"),
        numpy_helper.from_array(np.array([int(c) for c in real], np.uint8), "head_codes"),
        numpy_helper.from_array(np.array(int(MaskClass.MISSING), np.uint8), "head_missing_code"),
        numpy_helper.from_array(np.array(0.0, np.float32), "head_zero"),
        numpy_helper.from_array(np.array(255.0, np.float32), "head_255"),
    ]
    nodes += [
        # where the input has no data
        helper.make_node("Abs", [INPUT_NAME], ["input_abs"]),
        helper.make_node("ReduceMax", ["input_abs"], ["input_peak"], axes=[1], keepdims=0),
        helper.make_node("Equal", ["input_peak", "head_zero"], ["no_data"]),
        # best real class and its probability
        helper.make_node("Slice", [probs, "head_start", "head_end", "head_axis"], ["real_probs"]),
        helper.make_node("ArgMax", ["real_probs"], ["winner"], axis=1, keepdims=0),
        helper.make_node("Gather", ["head_codes", "winner"], ["real_class"]),
        helper.make_node("ReduceMax", ["real_probs"], ["real_top"], axes=[1], keepdims=0),
        helper.make_node(
            "Slice", [probs, "head_missing", "head_missing_end", "head_axis"], ["missing_4d"]
        ),
        helper.make_node("Squeeze", ["missing_4d", "head_axis"], ["missing_prob"]),
        helper.make_node("Where", ["no_data", "head_missing_code", "real_class"], [OUTPUT_CLASSES]),
        helper.make_node("Where", ["no_data", "missing_prob", "real_top"], ["top"]),
        helper.make_node("Mul", ["top", "head_255"], ["top255"]),
        helper.make_node("Round", ["top255"], ["top_round"]),
        helper.make_node("Cast", ["top_round"], [OUTPUT_CONFIDENCE], to=TensorProto.UINT8),
    ]


def _probability_nodes(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], probs: str
) -> None:
    """Sigmoid outputs -> ``cloud_probability``, uint8 percent.

    The network's sigmoids are independent (they need not sum to 1), so the probability is
    the odds between the strongest cloudy and the strongest cloud-free output:
    ``p = c / (c + k)`` with ``c = max(sigmoid SEMI_TRANSPARENT_CLOUD, sigmoid CLOUD)`` and
    ``k = max(sigmoid CLEAR, sigmoid CLOUD_SHADOW)``, as ``round(100 p)``. It is above 50
    exactly where ``classes`` says semi-transparent cloud or cloud and at most 50 where it
    says clear or shadow, so thresholding it at 50 reproduces the mask's cloud decision;
    a user who wants fewer missed cloud edges takes a lower threshold. 255 where the input
    has no data (``no_data`` of ``_add_head``).
    """
    order = list(NETWORK_OUTPUT_ORDER)

    def channel(name: str, cls: MaskClass) -> str:
        index = order.index(cls)
        inits.append(numpy_helper.from_array(np.array([index], np.int64), f"{name}_start"))
        inits.append(numpy_helper.from_array(np.array([index + 1], np.int64), f"{name}_end"))
        nodes.append(
            helper.make_node("Slice", [probs, f"{name}_start", f"{name}_end", "head_axis"], [name])
        )
        return name

    inits += [
        numpy_helper.from_array(np.array(100.0, np.float32), "prob_100"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "prob_eps"),
        numpy_helper.from_array(np.array(PROBABILITY_NODATA, np.uint8), "prob_nodata"),
    ]
    nodes += [
        helper.make_node(
            "Max",
            [
                channel("p_semi", MaskClass.SEMI_TRANSPARENT_CLOUD),
                channel("p_cloud", MaskClass.CLOUD),
            ],
            ["p_cloudy"],
        ),
        helper.make_node(
            "Max",
            [channel("p_clear", MaskClass.CLEAR), channel("p_shadow", MaskClass.CLOUD_SHADOW)],
            ["p_free"],
        ),
        helper.make_node("Add", ["p_cloudy", "p_free"], ["p_sum"]),
        helper.make_node("Max", ["p_sum", "prob_eps"], ["p_den"]),
        helper.make_node("Div", ["p_cloudy", "p_den"], ["p_odds"]),
        helper.make_node("Squeeze", ["p_odds", "head_axis"], ["p_odds_3d"]),
        helper.make_node("Mul", ["p_odds_3d", "prob_100"], ["p_percent"]),
        helper.make_node("Round", ["p_percent"], ["p_round"]),
        helper.make_node("Cast", ["p_round"], ["p_uint8"], to=TensorProto.UINT8),
        helper.make_node("Where", ["no_data", "prob_nodata", "p_uint8"], [OUTPUT_PROBABILITY]),
    ]


def _score_nodes(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> None:
    """The head's four real class scores (``real_probs`` of ``_add_head``) -> ``scores``,
    uint8 x 255: what the service blends across overlapping crops before deciding."""
    inits.append(numpy_helper.from_array(np.array(255.0, np.float32), "scores_255"))
    nodes += [
        helper.make_node("Mul", ["real_probs", "scores_255"], ["scores_scaled"]),
        helper.make_node("Round", ["scores_scaled"], ["scores_round"]),
        helper.make_node("Cast", ["scores_round"], [OUTPUT_SCORES], to=TensorProto.UINT8),
    ]


def add_missing_outputs(model: onnx.ModelProto) -> list[str]:
    """Give a model exported before ``cloud_probability`` or ``scores`` existed those
    outputs, in place (FP32 and INT8 files alike: the head reads the same tensors in
    both). Returns the names added (empty when it has them all)."""
    graph = model.graph
    produced = {name for node in graph.node for name in node.output}
    if PROBS not in produced or "no_data" not in produced or "real_probs" not in produced:
        raise ValueError(f"not a KappaMask graph: no {PROBS!r} / 'no_data' / 'real_probs' tensor")
    have = {o.name for o in graph.output}
    plane = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    added = []
    for name, build, shape in (
        (OUTPUT_PROBABILITY, lambda n, i: _probability_nodes(n, i, PROBS), plane),
        (OUTPUT_SCORES, _score_nodes, [plane[0], len(SCORE_CLASSES), *plane[1:]]),
    ):
        if name in have:
            continue
        nodes: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []
        build(nodes, inits)
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.UINT8, shape))
        added.append(name)
    if added:
        onnx.checker.check_model(model)
    return added


def model_metadata(
    level: str, features: Sequence[str], max_v: Sequence[float], version: str, origin: str
) -> dict[str, str]:
    """The metadata_props every exported model carries (read back by the installer)."""
    return {
        "kappamask.level": level,
        "kappamask.features": ",".join(features),
        "kappamask.max_v": ",".join(repr(float(v)) for v in max_v),
        "kappamask.version": version,
        "kappamask.origin": origin,
    }
