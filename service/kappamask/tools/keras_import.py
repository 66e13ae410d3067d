"""Import the published KappaMask weights (Keras 2 ``save_weights`` HDF5) into the served
ONNX format, reading the file with h5py only: no TensorFlow.

Every Conv2D kernel and bias is taken in the network's order (the file's ``layer_names``),
checked against the U-Net of DESIGN §3 whose input channels, base filters and outputs are
read from the kernels' shapes, transposed from Keras HWIO to ONNX OIHW, and handed to the
same graph builder as our own trained models.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import onnx

from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V, LEVELS, NUM_NETWORK_OUTPUTS
from kappamask.errors import InvalidInputError
from kappamask.inference.model_spec import ORIGIN_IMPORTED
from kappamask.model.architecture import conv_specs
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


def read_keras_convs(path: Path) -> list[KerasConv]:
    """The Conv2D layers of a Keras 2 HDF5 weights file, in the file's layer order."""
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise InvalidInputError(f"{path} is not an HDF5 file: {err}") from err
    with handle:
        # save_weights writes the layers at the root; model.save under "model_weights"
        root = handle.get("model_weights", handle)
        if "layer_names" not in root.attrs:
            raise InvalidInputError(f"{path} is not a Keras weights file (no layer_names)")
        convs: list[KerasConv] = []
        for layer_name in (_text(n) for n in root.attrs["layer_names"]):
            group = root[layer_name]
            weight_names = [_text(w) for w in group.attrs.get("weight_names", [])]
            if not weight_names:
                continue  # pooling, upsampling, dropout, concatenate, input
            arrays = {
                w.rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[w]) for w in weight_names
            }
            kernel, bias = arrays.get("kernel"), arrays.get("bias")
            if (
                kernel is None
                or kernel.ndim != 4
                or bias is None
                or set(arrays)
                != {
                    "kernel",
                    "bias",
                }
            ):
                raise InvalidInputError(
                    f"layer {layer_name} of {path.name} holds {sorted(arrays)}: not the "
                    "KappaMask U-Net (Conv2D layers with kernel and bias only)"
                )
            convs.append(KerasConv(layer_name, kernel, bias))
    return convs


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
) -> onnx.ModelProto:
    """Convert ``weights_file`` to the served ONNX model and write it to ``out_path``."""
    if level not in LEVELS:
        raise InvalidInputError(f"level must be one of {LEVELS}")
    features = tuple(features or DEFAULT_FEATURES[level])
    max_v = tuple(max_v or DEFAULT_MAX_V[level])
    if len(features) != len(max_v):
        raise InvalidInputError(f"{len(features)} features but {len(max_v)} max_v values")
    weights, in_channels, filters = keras_to_weights(read_keras_convs(weights_file), base_filters)
    if in_channels != len(features):
        raise InvalidInputError(
            f"the file's U-Net takes {in_channels} features; {level} has {len(features)} "
            f"({','.join(features)}): give the model's feature list with --features"
        )
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:12]
    label = version or f"keras-{weights_file.stem}-{digest}"
    model = build_model(
        weights, in_channels, filters, model_metadata(level, features, max_v, label, origin)
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    LOGGER.info(
        "imported %s: %s U-Net, %d features, %d base filters -> %s (%s)",
        weights_file.name, level, in_channels, filters, out_path, label,
    )  # fmt: skip
    return model
