"""DeepLabv3+ as KappaZeta's km_predict (v2.0 to v2.4) builds it, as a served ONNX graph.

km_predict's default architecture for both levels. The layout (the facts of km_predict's
``architectures.py``):

- an Xception-style extractor: an entry flow of two convolutions (32 filters, stride 2;
  64) and three blocks of two separable convolutions (128, 256, 728) ending in a 3 x 3
  max-pool of stride 2, each added to a strided 1 x 1 shortcut that is chained from the
  previous *shortcut*, not from the block's output; a middle flow of 8 residual blocks of
  three 728-filter separable convolutions; an exit flow whose second separable
  convolution (1024 filters) is tapped at output stride 16. The 1536/2048-filter layers
  after it are built by Keras but lie on no path to the output, so a weights file does not
  hold them;
- every convolution is preceded by ``CustomPad``: TensorFlow's SYMMETRIC padding (the
  edge pixel repeated, unlike ONNX's ``reflect``) of what a "same" convolution of that
  kernel, stride and dilation needs, the odd pixel at the bottom/right; and followed by
  BatchNormalization (folded into the convolution here);
- ASPP on the output-stride-16 features: image pooling (global average, a 1 x 1
  convolution with bias, broadcast back), 1 x 1, and 3 x 3 at dilations 6, 12 and 18, each
  256 filters, concatenated and projected by a 1 x 1 convolution;
- the decoder: ASPP upsampled x4 (Keras ``UpSampling2D(interpolation="bilinear")``, which
  is TensorFlow's half-pixel bilinear resize: ONNX ``Resize`` linear ``half_pixel``),
  concatenated with 48 1 x 1 filters over the BatchNormalization output of the second
  256-filter separable convolution (output stride 4), two 3 x 3 256-filter convolutions,
  upsampled x4, and a 1 x 1 convolution with a softmax over the six classes.

Input ``input`` [N, C, H, W] with H and W multiples of 16 and at least 288 (the
dilation-18 padding must fit the output-stride-16 map, as in TensorFlow); the outputs are
those of every served model (kappamask.model.onnx_graph's head, which reads the softmax
as it reads the U-Net's sigmoids).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kappamask.inference.model_spec import ARCHITECTURE_DEEPLAB
from kappamask.model.onnx_graph import INPUT_NAME, PROBS, finish_model

#: Keras BatchNormalization's default epsilon (km_predict keeps it).
BN_EPSILON = 1e-3
ARCHITECTURE = ARCHITECTURE_DEEPLAB
#: Smallest input side: the dilation-18 padding must fit the 1/16 map (TensorFlow's rule
#: for SYMMETRIC padding: at most the side).
MIN_SIDE = 18 * 16


@dataclass(frozen=True)
class Layer:
    """One layer of the layout with weights: ``conv`` (Conv2D, BatchNorm after it unless
    it is the last), ``sep`` (SeparableConv2D and its BatchNorm); its kernel, filters,
    stride, dilation and whether Keras gave it a bias."""

    kind: str
    kernel: int
    filters: int
    stride: int = 1
    dilation: int = 1
    bias: bool = False


def layout(classes: int) -> tuple[Layer, ...]:
    """km_predict's DeepLabv3+ layers with weights, in the order Keras creates them (so in
    the order of their automatic names' numbers), the unused exit-flow layers left out."""
    entry = [Layer("conv", 3, 32, 2), Layer("conv", 3, 64)]
    for filters in (128, 256, 728):
        entry += [Layer("sep", 3, filters), Layer("sep", 3, filters), Layer("conv", 1, filters, 2)]
    middle = [Layer("sep", 3, 728)] * 24
    exit_ = [Layer("sep", 3, 728), Layer("sep", 3, 1024)]
    aspp = [Layer("conv", 1, 256, bias=True), Layer("conv", 1, 256)]
    aspp += [Layer("conv", 3, 256, dilation=rate) for rate in (6, 12, 18)]
    aspp += [Layer("conv", 1, 256)]
    decoder = [
        Layer("conv", 1, 48),
        Layer("conv", 3, 256),
        Layer("conv", 3, 256),
        Layer("conv", 1, classes, bias=True),
    ]
    return (*entry, *middle, *exit_, *aspp, *decoder)


@dataclass(frozen=True)
class Folded:
    """A layer's weights as ONNX takes them, BatchNorm folded in: the convolution's
    kernel (OIHW) and bias, and for a separable one its depthwise kernel ([C, 1, k, k])."""

    weight: np.ndarray
    bias: np.ndarray
    depthwise: np.ndarray | None = None


def fold(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    bn: Mapping[str, np.ndarray] | None,
    depthwise: np.ndarray | None = None,
) -> Folded:
    """Keras weights (kernel HWIO, the depthwise kernel HWC1) with the BatchNorm after
    them folded in: ``gamma (x - mean) / sqrt(var + eps) + beta``."""
    weight = kernel.transpose(3, 2, 0, 1).astype(np.float64)
    shift = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    if bn is not None:
        scale = bn["gamma"] / np.sqrt(bn["moving_variance"].astype(np.float64) + BN_EPSILON)
        weight = weight * scale[:, None, None, None]
        shift = (shift - bn["moving_mean"]) * scale + bn["beta"]
    dw = None
    if depthwise is not None:
        dw = np.ascontiguousarray(depthwise.transpose(2, 3, 0, 1), dtype=np.float32)
    return Folded(np.ascontiguousarray(weight, dtype=np.float32), shift.astype(np.float32), dw)


def _same_pads(kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """CustomPad's (before, after) for a side divisible by the stride (every side here)."""
    span = kernel + (kernel - 1) * (dilation - 1)
    total = max(span - stride, 0)
    return total // 2, total - total // 2


class _Graph:
    """Nodes and initializers of the graph being built, with unique tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], stem: str | None = None, **attrs: Any) -> str:
        out = self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def symmetric_pad(self, x: str, before: int, after: int) -> str:
        """TensorFlow's SYMMETRIC padding of H and W (the edge pixel repeated): the first
        ``before`` rows mirrored above, the last ``after`` below, then the same for the
        columns; as slices with step -1 and concatenations (no ONNX Pad mode does it)."""
        for axis in (2, 3):
            parts = []
            if before:
                parts.append(self._mirror(x, axis, before - 1, None, "pad_head"))
            parts.append(x)
            if after:
                parts.append(self._mirror(x, axis, -1, -after - 1, "pad_tail"))
            if len(parts) > 1:
                x = self.op("Concat", parts, "pad", axis=axis)
        return x

    def _mirror(self, x: str, axis: int, start: int, end: int | None, stem: str) -> str:
        big = np.iinfo(np.int64).min
        starts = self.const("starts", np.array([start], np.int64))
        ends = self.const("ends", np.array([big if end is None else end], np.int64))
        axes = self.const("axes", np.array([axis], np.int64))
        steps = self.const("steps", np.array([-1], np.int64))
        return self.op("Slice", [x, starts, ends, axes, steps], stem)

    def named(self, name: str, value: np.ndarray) -> str:
        """An initializer under a stable name (``entry1.weight``): the quantiser keeps
        layers in FP32 by these names (kappamask.tools.quantize)."""
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, x: str, layer: Layer, weights: Folded, activation: str | None, name: str) -> str:
        before, after = _same_pads(layer.kernel, layer.stride, layer.dilation)
        x = self.symmetric_pad(x, before, after)
        args = dict(
            kernel_shape=[layer.kernel] * 2,
            strides=[layer.stride] * 2,
            dilations=[layer.dilation] * 2,
        )
        if weights.depthwise is not None:
            channels = weights.depthwise.shape[0]
            x = self.op(
                "Conv",
                [x, self.named(f"{name}.depthwise", weights.depthwise)],
                "depthwise",
                group=channels,
                **args,
            )
            args = dict(kernel_shape=[1, 1])
        x = self.op(
            "Conv",
            [
                x,
                self.named(f"{name}.weight", weights.weight),
                self.named(f"{name}.bias", weights.bias),
            ],
            "conv",
            **args,
        )
        return self.op("Relu", [x]) if activation == "relu" else x

    def max_pool(self, x: str) -> str:
        before, after = _same_pads(3, 2, 1)
        x = self.symmetric_pad(x, before, after)
        return self.op("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2])

    def upsample4(self, x: str) -> str:
        scales = self.const("scales", np.array([1, 1, 4, 4], np.float32))
        return self.op(
            "Resize",
            [x, "", scales],
            "up",
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        )


#: Where each part of the layout begins (layout order) and its name's stem.
_PARTS = ((0, "entry"), (11, "middle"), (35, "exit"), (37, "aspp"), (43, "decoder"))


def layer_names(count: int) -> list[str]:
    """Stable names of the layout's layers: ``entry1`` .. ``entry11``, ``middle1`` ..,
    ``exit1``, ``exit2``, ``aspp1`` .., ``decoder1`` .. ``decoder3``, and ``head`` for the
    last (the quantiser's FP32 ladder names them)."""
    names = []
    for index in range(count - 1):
        start, stem = max(p for p in _PARTS if p[0] <= index)
        names.append(f"{stem}{index - start + 1}")
    return [*names, "head"]


def build_deeplab(
    layers: Sequence[Folded], in_channels: int, metadata: Mapping[str, str] | None = None
) -> onnx.ModelProto:
    """The served ONNX model from ``layers`` (``fold``-ed, in ``layout`` order)."""
    spec = layout(layers[-1].weight.shape[0])
    if len(layers) != len(spec):
        raise ValueError(f"{len(layers)} layers; km_predict's DeepLabv3+ has {len(spec)}")
    g = _Graph()
    pending: Iterator[tuple[str, Layer, Folded]] = iter(
        zip(layer_names(len(spec)), spec, layers, strict=True)
    )

    def next_layer(x: str, activation: str | None = "relu") -> str:
        name, layer, weights = next(pending)
        return g.conv(x, layer, weights, activation, name)

    # entry flow
    x = next_layer(next_layer(INPUT_NAME))
    shortcut, low_level = x, ""
    for block in range(3):
        y = next_layer(x if block == 0 else g.op("Relu", [x]))
        y = next_layer(y, activation=None)
        if block == 1:
            low_level = y  # BatchNorm output of the second 256-filter convolution
        y = g.max_pool(y)
        shortcut = next_layer(shortcut, activation=None)
        x = g.op("Add", [shortcut, y])
    # middle flow: residual blocks
    for _ in range(8):
        y = x
        for _ in range(3):
            y = next_layer(g.op("Relu", [y]), activation=None)
        x = g.op("Add", [x, g.op("Relu", [y])])
    # exit flow, up to the output-stride-16 tap
    y = next_layer(g.op("Relu", [x]))
    features = next_layer(y, activation=None)
    # ASPP
    pooled = g.op("GlobalAveragePool", [features])
    pooled = next_layer(pooled)
    branches = [next_layer(features) for _ in range(4)]
    pooled = g.op("Expand", [pooled, g.op("Shape", [branches[0]])], "broadcast")
    aspp = next_layer(g.op("Concat", [pooled, *branches], "aspp", axis=1))
    # decoder
    low = next_layer(low_level)
    x = g.op("Concat", [g.upsample4(aspp), low], "decoder", axis=1)
    x = next_layer(next_layer(x))
    logits = next_layer(g.upsample4(x), activation=None)
    g.nodes.append(helper.make_node("Softmax", [logits], [PROBS], axis=1))
    return finish_model(g.nodes, g.inits, in_channels, "kappamask_deeplabv3plus", metadata)
