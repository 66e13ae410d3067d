"""Export a trained PyTorch U-Net to the served ONNX format (see onnx_graph)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from kappamask.inference.model_spec import ORIGIN_BOOTSTRAP
from kappamask.model.onnx_graph import build_model, model_metadata
from kappamask.tools.unet import UNet


def export_onnx(
    model: UNet,
    level: str,
    features: Sequence[str],
    max_v: Sequence[float],
    version: str,
    out_path: Path,
    origin: str = ORIGIN_BOOTSTRAP,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` as ONNX with its level, features, max_v and version in the metadata
    (and ``extra`` metadata_props, e.g. a fine-tuned model's ``kappamask.parent_sha256``)."""
    if len(features) != model.in_channels:
        raise ValueError(f"{len(features)} features for a {model.in_channels}-channel model")
    graph = build_model(
        model.numpy_weights(),
        model.in_channels,
        model.base_filters,
        {**model_metadata(level, features, max_v, version, origin), **(extra or {})},
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(out_path))
    return out_path
