"""Import Keras 2 ``save_weights`` HDF5 files (the published KappaMask weights, km_predict's
U-Net and DeepLabv3+ files) into the served ONNX format, reading the file with h5py only:
no TensorFlow.

The architecture is recognised from the layers: SeparableConv2D and BatchNormalization
layers make km_predict's DeepLabv3+ (kappamask.model.deeplab), Conv2D layers with kernel
and bias only the U-Net of ARCHITECTURE.md §3. U-Net kernels are taken in the file's layer order;
DeepLabv3+ layers in Keras' creation order (the numbers of their automatic names, which a
file's layer order need not follow), BatchNorm folded into the convolution before it.
Every layer is checked against the layout, transposed from Keras HWIO to ONNX OIHW and
handed to the graph builder of its architecture.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import onnx

from kappamask.bands import (
    ARCHITECTURE_FEATURES,
    ARCHITECTURE_MAX_V,
    LEVELS,
    NUM_NETWORK_OUTPUTS,
)
from kappamask.errors import InvalidInputError
from kappamask.inference.model_spec import (
    ARCHITECTURE_DEEPLAB,
    ARCHITECTURE_UNET,
    OFFSET_RULES,
    OFFSET_TRAINING,
    ORIGIN_IMPORTED,
)
from kappamask.model import deeplab
from kappamask.model.architecture import conv_specs
from kappamask.model.deeplab import Folded
from kappamask.model.onnx_graph import Weights, build_model, model_metadata

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class KerasConv:
    """One Conv2D layer of the file: its Keras name, kernel (HWIO) and bias."""

    name: str
    kernel: np.ndarray
    bias: np.ndarray


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_keras_layers(path: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The layers with weights of a Keras 2 HDF5 weights file, in the file's order: each
    name with its arrays by short name (``kernel``, ``gamma``, ``depthwise_kernel``...)."""
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise InvalidInputError(f"{path} is not an HDF5 file: {err}") from err
    with handle:
        # save_weights writes the layers at the root; model.save under "model_weights"
        root = handle.get("model_weights", handle)
        if "layer_names" not in root.attrs:
            raise InvalidInputError(f"{path} is not a Keras weights file (no layer_names)")
        found = []
        for layer_name in (_text(n) for n in root.attrs["layer_names"]):
            group = root[layer_name]
            weight_names = [_text(w) for w in group.attrs.get("weight_names", [])]
            if not weight_names:
                continue  # pooling, upsampling, dropout, concatenate, padding, input
            found.append(
                (
                    layer_name,
                    {
                        w.rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[w])
                        for w in weight_names
                    },
                )
            )
    return found


def architecture_of(layers: Sequence[tuple[str, dict[str, np.ndarray]]]) -> str:
    """``deeplabv3plus`` where the file has separable convolutions, else ``unet``."""
    separable = any("depthwise_kernel" in arrays for _n, arrays in layers)
    return ARCHITECTURE_DEEPLAB if separable else ARCHITECTURE_UNET


def read_keras_convs(path: Path) -> list[KerasConv]:
    """The Conv2D layers of a Keras 2 HDF5 weights file of the U-Net, in the file's order."""
    convs: list[KerasConv] = []
    for layer_name, arrays in read_keras_layers(path):
        kernel, bias = arrays.get("kernel"), arrays.get("bias")
        if kernel is None or kernel.ndim != 4 or bias is None or set(arrays) != {"kernel", "bias"}:
            raise InvalidInputError(
                f"layer {layer_name} of {path.name} holds {sorted(arrays)}: not the "
                "KappaMask U-Net (Conv2D layers with kernel and bias only)"
            )
        convs.append(KerasConv(layer_name, kernel, bias))
    return convs


_BN_KEYS = {"gamma", "beta", "moving_mean", "moving_variance"}
_AUTO_NAME = re.compile(r"_(\d+)$")


def _creation_order(layers: Sequence[tuple[str, dict[str, np.ndarray]]]) -> list[int]:
    """Indices of ``layers`` in the order Keras created them: ``conv2d``, ``conv2d_1``...;
    names without a number keep the file's order."""

    def number(item: tuple[int, tuple[str, dict[str, np.ndarray]]]) -> int:
        found = _AUTO_NAME.search(item[1][0])
        return int(found.group(1)) if found else 0

    return [i for i, _layer in sorted(enumerate(layers), key=number)]


def deeplab_layers(
    layers: Sequence[tuple[str, dict[str, np.ndarray]]], where: str
) -> tuple[list[Folded], int]:
    """km_predict's DeepLabv3+ from a file's layers: each convolution with the BatchNorm
    after it folded in, in ``deeplab.layout`` order; and the number of input features."""
    kinds: dict[str, list[tuple[str, dict[str, np.ndarray]]]] = {"conv": [], "sep": [], "bn": []}
    for name, arrays in layers:
        keys = set(arrays)
        kind = (
            "sep"
            if {"depthwise_kernel", "pointwise_kernel"}
            <= keys
            <= {"depthwise_kernel", "pointwise_kernel", "bias"}
            else "bn"
            if keys == _BN_KEYS
            else "conv"
            if "kernel" in keys and keys <= {"kernel", "bias"}
            else None
        )
        if kind is None:
            raise InvalidInputError(
                f"layer {name} of {where} holds {sorted(keys)}: not a layer "
                "of km_predict's DeepLabv3+"
            )
        kinds[kind].append((name, arrays))
    created = {k: [v[i] for i in _creation_order(v)] for k, v in kinds.items()}
    ordered = {k: iter(v) for k, v in created.items()}
    last = created["conv"][-1][1]["kernel"] if created["conv"] else None
    classes = int(last.shape[3]) if last is not None else 0
    if classes != NUM_NETWORK_OUTPUTS:
        raise InvalidInputError(
            f"{where}: the last convolution has {classes} outputs; km_predict's models have "
            f"{NUM_NETWORK_OUTPUTS} (UNDEFINED, CLEAR, CLOUD_SHADOW, SEMI_TRANSPARENT_CLOUD, "
            "CLOUD, MISSING)"
        )
    spec = deeplab.layout(classes)
    expected = {k: sum(layer.kind == k for layer in spec) for k in ("conv", "sep")}
    expected["bn"] = len(spec) - 1
    counts = {k: len(v) for k, v in kinds.items()}
    if counts != expected:
        raise InvalidInputError(
            f"{where} holds {counts} convolutions, separable convolutions and BatchNorms; "
            f"km_predict's DeepLabv3+ has {expected}"
        )
    folded = []
    channels = in_channels = 0
    for index, layer in enumerate(spec):
        name, arrays = next(ordered[layer.kind])
        bn = None if index == len(spec) - 1 else next(ordered["bn"])[1]
        if layer.kind == "sep":
            depthwise, kernel = arrays["depthwise_kernel"], arrays["pointwise_kernel"]
            shape_ok = (
                depthwise.shape[:2] == (layer.kernel, layer.kernel)
                and kernel.shape[:2] == (1, 1)
                and depthwise.shape[2] == kernel.shape[2]
            )
        else:
            depthwise, kernel = None, arrays["kernel"]
            shape_ok = kernel.shape[:2] == (layer.kernel, layer.kernel)
        shape_ok = (
            shape_ok
            and kernel.shape[3] == layer.filters
            and ("bias" in arrays) == layer.bias
            and (bn is None or bn["gamma"].shape == (layer.filters,))
        )
        if not shape_ok:
            raise InvalidInputError(
                f"layer {name} of {where} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())}"
                f") is not layer {index} of km_predict's DeepLabv3+ ({layer.kind}, "
                f"{layer.kernel} x {layer.kernel}, {layer.filters} filters)"
            )
        if index == 0:
            in_channels = int(kernel.shape[2])
        channels = int(kernel.shape[3])
        folded.append(deeplab.fold(kernel, arrays.get("bias"), bn, depthwise))
    assert channels == classes
    return folded, in_channels


def keras_to_weights(
    convs: Sequence[KerasConv], base_filters: int | None = None
) -> tuple[Weights, int, int]:
    """Map the Keras convolutions onto the U-Net's parameter names.

    Returns (weights, in_channels, base_filters); ``base_filters``, when given, must match
    what the file holds.
    """
    if not convs:
        raise InvalidInputError("the file holds no Conv2D layers")
    in_channels, found_filters = convs[0].kernel.shape[2], convs[0].kernel.shape[3]
    if base_filters is not None and base_filters != found_filters:
        raise InvalidInputError(
            f"the file's U-Net has {found_filters} base filters, not {base_filters}"
        )
    outputs = convs[-1].kernel.shape[3]
    if outputs != NUM_NETWORK_OUTPUTS:
        raise InvalidInputError(
            f"the file's last layer has {outputs} outputs; the KappaMask U-Nets have "
            f"{NUM_NETWORK_OUTPUTS} (UNDEFINED, CLEAR, CLOUD_SHADOW, SEMI_TRANSPARENT_CLOUD, "
            "CLOUD, MISSING)"
        )
    specs = conv_specs(in_channels, found_filters, outputs)
    if len(specs) != len(convs):
        raise InvalidInputError(
            f"the file holds {len(convs)} Conv2D layers; the 5-level U-Net has {len(specs)}"
        )
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec, conv in zip(specs, convs, strict=True):
        expected = (spec.kernel, spec.kernel, spec.in_channels, spec.out_channels)
        if conv.kernel.shape != expected or conv.bias.shape != (spec.out_channels,):
            raise InvalidInputError(
                f"layer {conv.name}: kernel {conv.kernel.shape} / bias {conv.bias.shape}, "
                f"but {spec.name} of the U-Net needs {expected}"
            )
        weights[spec.name] = (
            np.ascontiguousarray(conv.kernel.transpose(3, 2, 0, 1), dtype=np.float32),
            conv.bias.astype(np.float32),
        )
    return weights, in_channels, found_filters


def import_keras(
    weights_file: Path,
    level: str,
    out_path: Path,
    base_filters: int | None = None,
    features: Sequence[str] | None = None,
    max_v: Sequence[float] | None = None,
    version: str | None = None,
    origin: str = ORIGIN_IMPORTED,
    offset_rule: str = OFFSET_TRAINING,
) -> onnx.ModelProto:
    """Convert ``weights_file`` (a U-Net or km_predict's DeepLabv3+, recognised from its
    layers) to the served ONNX model and write it to ``out_path``. Features and max_v
    default to those of the architecture and level (kappamask.bands); ``offset_rule``
    (model_spec.OFFSET_RULES) is recorded for the reader."""
    if level not in LEVELS:
        raise InvalidInputError(f"level must be one of {LEVELS}")
    if offset_rule not in OFFSET_RULES:
        raise InvalidInputError(f"offset rule must be one of {OFFSET_RULES}")
    layers = read_keras_layers(weights_file)
    architecture = architecture_of(layers)
    features = tuple(features or ARCHITECTURE_FEATURES[architecture][level])
    max_v = tuple(max_v or ARCHITECTURE_MAX_V[architecture][level])
    if len(features) != len(max_v):
        raise InvalidInputError(f"{len(features)} features but {len(max_v)} max_v values")
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    label = version or f"keras-{weights_file.stem}-{digest[:12]}"
    metadata = {
        **model_metadata(level, features, max_v, label, origin),
        "kappamask.architecture": architecture,
        "kappamask.weights_sha256": digest,
        "kappamask.offset_rule": offset_rule,
    }
    if architecture == ARCHITECTURE_DEEPLAB:
        if base_filters is not None:
            raise InvalidInputError("--filters is a U-Net's; this file is a DeepLabv3+")
        folded, in_channels = deeplab_layers(layers, weights_file.name)
        _check_features(in_channels, features, level, "DeepLabv3+")
        model = deeplab.build_deeplab(folded, in_channels, metadata)
        detail = "DeepLabv3+ (km_predict)"
    else:
        weights, in_channels, filters = keras_to_weights(
            read_keras_convs(weights_file), base_filters
        )
        _check_features(in_channels, features, level, "U-Net")
        model = build_model(weights, in_channels, filters, metadata)
        detail = f"U-Net, {filters} base filters"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    LOGGER.info(
        "imported %s: %s %s, %d features -> %s (%s)",
        weights_file.name,
        level,
        detail,
        in_channels,
        out_path,
        label,
    )
    return model


def _check_features(in_channels: int, features: Sequence[str], level: str, what: str) -> None:
    if in_channels != len(features):
        raise InvalidInputError(
            f"the file's {what} takes {in_channels} features; {level} has {len(features)} "
            f"({','.join(features)}): give the model's feature list with --features"
        )
