"""Build the served ONNX graph straight from numpy weights (no PyTorch, no TensorFlow).

Input ``input`` float32 [N, C, H, W] (normalised features, H and W multiples of 16);
outputs ``classes`` uint8 [N, H, W] with mask codes and ``confidence`` uint8 [N, H, W]
(the winning sigmoid x 255). See ``_add_head`` for how MISSING and UNDEFINED are handled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kappamask.bands import NETWORK_OUTPUT_ORDER, MaskClass
from kappamask.model.architecture import LEVELS, conv_specs

OPSET = 17
INPUT_NAME = "input"
OUTPUT_CLASSES = "classes"
OUTPUT_CONFIDENCE = "confidence"

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
                "Conv", [x, f"{name}.weight", f"{name}.bias"], [out + "_pre"],
                kernel_shape=[spec.kernel, spec.kernel], pads=_same_pads(spec.kernel),
            )
        )  # fmt: skip
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
            helper.make_node("Resize", [x, "", "up_scales"], [up], mode="nearest",
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        )  # fmt: skip
        x = conv(f"up{level}.conv", up)
        cat = f"concat{level}"
        nodes.append(helper.make_node("Concat", [skips[level - 1], x], [cat], axis=1))
        x = conv(f"dec{level}.conv2", conv(f"dec{level}.conv1", cat))
    probs = conv("head.conv2", conv("head.conv1", x))
    _add_head(nodes, inits, probs)

    plane = ["batch", "height", "width"]
    graph = helper.make_graph(
        nodes,
        "kappamask_unet",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, [plane[0], in_channels, *plane[1:]]
            )
        ],
        [
            helper.make_tensor_value_info(OUTPUT_CLASSES, TensorProto.UINT8, plane),
            helper.make_tensor_value_info(OUTPUT_CONFIDENCE, TensorProto.UINT8, plane),
        ],
        inits,
    )  # fmt: skip
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
    assert real == [MaskClass.CLEAR, MaskClass.CLOUD_SHADOW,
                    MaskClass.SEMI_TRANSPARENT_CLOUD, MaskClass.CLOUD]  # fmt: skip
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
