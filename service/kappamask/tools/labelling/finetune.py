"""Fine-tuning a served U-Net on the sub-tiles people labelled (the paper's loop, §2 and
Figure 1; needs the ``train`` extra).

The parent's weights are read back from its ONNX file into the PyTorch U-Net (the names
``onnx_graph.build_model`` gave them), trained on crops of the labelled sub-tiles with
their band stacks exactly as the served model saw them, and exported with origin
``fine-tuned`` and the parent file's SHA-256. Some labelled sub-tiles are kept out of
training (``--holdout``, or every fifth by rank): the report gives the agreement on them
before and after, and how much of what nobody labelled changed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import rasterio
import torch
from onnx import numpy_helper

from kappamask.bands import MaskClass
from kappamask.errors import InvalidInputError
from kappamask.inference.model_spec import ARCHITECTURE_UNET, ModelSpec
from kappamask.inference.repository import sha256_of, spec_from_onnx
from kappamask.model.architecture import conv_specs
from kappamask.tools.datasets import Batch, augment
from kappamask.tools.importance import LabelledTile
from kappamask.tools.labelling.subtiles import ReviewFolder, read_labels
from kappamask.tools.metrics import agreement
from kappamask.tools.train import FitConfig, fit, predict
from kappamask.tools.unet import UNet

#: Without --holdout: every HOLDOUT_EVERY-th labelled sub-tile by rank (the 2nd, 7th, ...)
#: is kept out, at least one.
HOLDOUT_EVERY = 5
#: A fine-tuning run: a low learning rate from the parent's weights, clipped steps (the
#: paper's U-Net has no normalisation layers), bfloat16 where the CPU has it.
FINE_TUNE_FIT = FitConfig(
    crop=256,
    batch_size=4,
    steps_per_epoch=25,
    max_epochs=12,
    max_minutes=20.0,
    learning_rate=1e-4,
    loss="ce+bce",
    patience=4,
    lr_patience=2,
    val_batches=2,
    bf16=True,
    grad_clip=1.0,
)


def unet_from_onnx(path: Path) -> tuple[UNet, ModelSpec]:
    """The PyTorch U-Net holding an exported model's weights, and its spec."""
    spec = spec_from_onnx(path)
    if spec.architecture != ARCHITECTURE_UNET:
        raise InvalidInputError(
            f"{path} is a {spec.architecture} model: fine-tuning takes the paper's U-Net"
        )
    graph = onnx.load(str(path))
    weights = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    try:
        base_filters = int(weights["enc1.conv1.weight"].shape[0])
        head_channels = int(weights["head.conv1.weight"].shape[0])
    except KeyError as err:
        raise InvalidInputError(f"{path} holds no KappaMask U-Net weights ({err})") from None
    model = UNet(len(spec.features), base_filters, head_channels=head_channels)
    with torch.no_grad():
        for conv in conv_specs(len(spec.features), base_filters, head_channels=head_channels):
            layer = model.layer(conv.name)
            layer.weight.copy_(torch.tensor(weights[f"{conv.name}.weight"]))
            assert layer.bias is not None
            layer.bias.copy_(torch.tensor(weights[f"{conv.name}.bias"]))
    return model, spec


def load_labelled(folder: ReviewFolder, spec: ModelSpec) -> list[LabelledTile]:
    """The review's labelled sub-tiles, their band stacks checked against ``spec`` (the
    same features in the same order, the same max_v): otherwise the parent would learn
    from inputs it never sees."""
    tiles = []
    for tile, label_path in folder.labelled():
        with rasterio.open(tile.bands) as src:
            features = src.read().astype(np.float32)
            names, tags = tuple(src.descriptions), src.tags()
        if names != spec.features:
            raise InvalidInputError(
                f"{tile.name} holds the features {names}, but {spec.name} reads {spec.features}"
            )
        max_v = tuple(float(v) for v in tags.get("max_v", "").split(",") if v)
        if max_v and not np.allclose(max_v, spec.max_v):
            raise InvalidInputError(f"{tile.name} was normalised with other max_v than {spec.name}")
        labels = read_labels(label_path)[0]
        if (labels != MaskClass.UNDEFINED).any():
            tiles.append(LabelledTile(tile.name, features, labels, names, spec.max_v))
    if len(tiles) < 2:
        raise InvalidInputError(
            f"{folder.root} holds {len(tiles)} labelled sub-tile(s): fine-tuning needs at least "
            "two, one of them kept out to measure the result"
        )
    return tiles


def split(
    tiles: Sequence[LabelledTile], holdout: Sequence[str] = ()
) -> tuple[list[LabelledTile], list[LabelledTile]]:
    """(training, held-out): the sub-tiles whose names contain a ``holdout`` part, or
    every ``HOLDOUT_EVERY``-th by rank from the second."""
    if holdout:
        held = [t for t in tiles if any(part in t.name for part in holdout)]
    else:
        held = list(tiles[1::HOLDOUT_EVERY])
    kept_out = {t.name for t in held}
    train = [t for t in tiles if t.name not in kept_out]
    if not held or not train:
        raise InvalidInputError(
            f"{len(held)} of {len(tiles)} labelled sub-tiles held out: both parts need one"
        )
    return train, held


class LabelledSource:
    """Training crops from the training sub-tiles (each drawn by its labelled pixels),
    fixed validation crops from the held-out ones."""

    name = "labelled"

    def __init__(self, train: Sequence[LabelledTile], held: Sequence[LabelledTile]) -> None:
        self.train, self.held = list(train), list(held)
        counts = np.array([(t.labels != MaskClass.UNDEFINED).sum() for t in self.train], float)
        self.weights = counts / counts.sum()

    @staticmethod
    def _crop(tile: LabelledTile, crop: int, rng: np.random.Generator) -> Batch:
        features, labels = tile.features, tile.labels
        _c, h, w = features.shape
        if h < crop or w < crop:  # a sub-tile cut by the raster's edge
            pad = ((0, max(0, crop - h)), (0, max(0, crop - w)))
            features = np.pad(features, ((0, 0), *pad), mode="symmetric")
            labels = np.pad(labels, pad, constant_values=int(MaskClass.UNDEFINED))
            h, w = labels.shape
        y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        return augment(
            features[:, y0 : y0 + crop, x0 : x0 + crop], labels[y0 : y0 + crop, x0 : x0 + crop], rng
        )

    def train_crop(self, crop: int, rng: np.random.Generator) -> Batch:
        tile = self.train[int(rng.choice(len(self.train), p=self.weights))]
        return self._crop(tile, crop, rng)

    def validation_crops(self, crop: int, count: int, seed: int) -> list[Batch]:
        rng = np.random.default_rng(seed)
        return [self._crop(self.held[i % len(self.held)], crop, rng) for i in range(count)]


def _score(model: UNet, tiles: Sequence[LabelledTile]) -> dict[str, Any]:
    preds = [predict(model, t.features) for t in tiles]
    pooled = agreement(
        np.concatenate([p.ravel() for p in preds]),
        np.concatenate([t.labels.ravel() for t in tiles]),
    )
    classes = {
        name: {"dice": v.get("dice"), "support": v["support"]}
        for name, v in pooled["classes"].items()
    }
    return {
        "pixels": pooled["pixels"],
        "overall_accuracy": pooled.get("overall_accuracy"),
        "classes": classes,
    }


def _unlabelled_change(parent: UNet, child: UNet, folder: ReviewFolder) -> float | None:
    """Share of the pixels with data, on the review's sub-tiles nobody labelled, whose
    class the fine-tuned model changes (None where all are labelled)."""
    labelled = {t.name for t, _p in folder.labelled()}
    changed = total = 0
    for tile in folder.tiles:
        if tile.name in labelled:
            continue
        with rasterio.open(tile.bands) as src:
            features = src.read().astype(np.float32)
        before, after = predict(parent, features), predict(child, features)
        data = before != MaskClass.MISSING
        changed += int((before != after)[data].sum())
        total += int(data.sum())
    return changed / total if total else None


def fine_tune(
    folder: ReviewFolder,
    parent_path: Path,
    out_dir: Path,
    fit_config: FitConfig = FINE_TUNE_FIT,
    holdout: Sequence[str] = (),
) -> tuple[UNet, ModelSpec, dict[str, Any]]:
    """Fine-tune the parent on the review's labels; writes checkpoint.pt, metrics.csv and
    holdout.json (before and after on the held-out sub-tiles) in ``out_dir``."""
    parent, spec = unet_from_onnx(parent_path)
    model = copy.deepcopy(parent)
    train_tiles, held = split(load_labelled(folder, spec), holdout)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "parent": {
            "path": str(parent_path),
            "sha256": sha256_of(parent_path),
            "name": spec.name,
            "version": spec.version_label,
        },
        "train": [t.name for t in train_tiles],
        "held_out": [t.name for t in held],
        "fit": asdict(fit_config),
        "before": {"held_out": _score(parent, held), "train": _score(parent, train_tiles)},
    }
    (out_dir / "config.json").write_text(json.dumps(report, indent=2))
    fit(model, [LabelledSource(train_tiles, held)], fit_config, out_dir)
    report["after"] = {"held_out": _score(model, held), "train": _score(model, train_tiles)}
    report["unlabelled_changed"] = _unlabelled_change(parent, model, folder)
    (out_dir / "holdout.json").write_text(json.dumps(report, indent=2))
    return model, spec, report
