"""Training of the KappaMask U-Net (paper §2.3), seeded and resumable.

Adam, generalised dice loss with UNDEFINED excluded, learning rate reduced on plateau,
early stopping on validation loss, flips and 90 degree rotations. Here the data is one
SAFE product with Sen2Cor SCL labels, split in space (a block of rows is held out).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window
from tqdm import tqdm

from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V, OUTPUT_CLASSES, MaskClass
from kappamask.model.labels import read_scl_labels
from kappamask.model.losses import LOSSES
from kappamask.model.unet import UNet
from kappamask.reader import BandReader, output_grid
from kappamask.sources import open_safe

LOGGER = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that decides a training run (written next to its outputs)."""

    product: str
    level: str = "L2A"
    resolution: int = 60
    base_filters: int = 32
    crop: int = 256
    batch_size: int = 4
    steps_per_epoch: int = 50
    max_epochs: int = 30
    max_minutes: float = 20.0
    learning_rate: float = 1e-3
    loss: str = "gdl"
    patience: int = 6
    holdout_fraction: float = 0.2
    seed: int = 0


@dataclass
class Scene:
    """Normalised features [C, H, W], mask-code labels [H, W] and the validity mask."""

    features: np.ndarray
    labels: np.ndarray
    valid: np.ndarray


def load_scene(path: str, level: str, resolution: int) -> Scene:
    """Read a product's model features and its SCL labels on one grid."""
    product = open_safe(path)
    grid = output_grid(product, resolution)
    with BandReader(product, DEFAULT_FEATURES[level], DEFAULT_MAX_V[level], grid) as reader:
        features, valid = reader.read(Window(0, 0, grid.width, grid.height))
    labels = read_scl_labels(product, grid)
    labels[~valid] = MaskClass.MISSING
    return Scene(features, labels, valid)


def split_rows(height: int, holdout_fraction: float) -> tuple[slice, slice]:
    """Train on the top rows, hold out the bottom block (no spatial leakage but the seam)."""
    cut = round(height * (1.0 - holdout_fraction))
    return slice(0, cut), slice(cut, height)


def sample_batch(
    scene: Scene, rows: slice, crop: int, batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops from ``rows`` with random flips and 90 degree rotations."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    height = rows.stop - rows.start
    width = scene.labels.shape[1]
    while len(xs) < batch:
        y0 = rows.start + int(rng.integers(0, height - crop + 1))
        x0 = int(rng.integers(0, width - crop + 1))
        lab = scene.labels[y0 : y0 + crop, x0 : x0 + crop]
        if (lab == MaskClass.MISSING).mean() > 0.9:
            continue  # crops of empty swath teach nothing
        feat = scene.features[:, y0 : y0 + crop, x0 : x0 + crop]
        k = int(rng.integers(0, 4))
        feat, lab = np.rot90(feat, k, axes=(1, 2)), np.rot90(lab, k)
        if rng.random() < 0.5:
            feat, lab = feat[:, :, ::-1], lab[:, ::-1]
        xs.append(np.ascontiguousarray(feat))
        ys.append(np.ascontiguousarray(lab))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def predict(model: UNet, features: np.ndarray) -> np.ndarray:
    """Mask codes for a whole [C, H, W] array (padded to a multiple of 16)."""
    _c, h, w = features.shape
    ph, pw = -h % 16, -w % 16
    x = torch.from_numpy(np.pad(features, ((0, 0), (0, ph), (0, pw))))[None]
    model.eval()
    with torch.no_grad():
        probs = model(x)[0, 1:5, :h, :w].numpy()
    # as the served graph does: MISSING where there is no data, else the best real class
    codes = np.array([1, 2, 3, 4], dtype=np.uint8)
    result: np.ndarray = np.where((features == 0).all(axis=0), 0, codes[probs.argmax(0)])
    return result.astype(np.uint8)


def agreement(pred: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Overall accuracy and per-class dice of ``pred`` against ``ref`` (UNDEFINED and
    MISSING reference pixels excluded)."""
    keep = (ref != MaskClass.UNDEFINED) & (ref != MaskClass.MISSING)
    p, r = pred[keep], ref[keep]
    out: dict[str, Any] = {
        "pixels": float(keep.sum()),
        "overall_accuracy": float((p == r).mean()) if keep.any() else 0.0,
    }
    for cls in OUTPUT_CLASSES[1:]:
        tp = float(((p == cls) & (r == cls)).sum())
        denom = float((p == cls).sum() + (r == cls).sum())
        out[f"dice_{cls.name.lower()}"] = 2 * tp / denom if denom else float("nan")
    real = [int(c) for c in OUTPUT_CLASSES[1:]]
    out["confusion_rows_reference_cols_predicted"] = [
        [int(((r == a) & (p == b)).sum()) for b in [0, *real]] for a in real
    ]
    return out


def train(config: TrainConfig, out_dir: Path) -> tuple[UNet, dict[str, Any]]:
    """Train per ``config``; writes checkpoint.pt, metrics.csv and holdout.json in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scene = load_scene(config.product, config.level, config.resolution)
    train_rows, hold_rows = split_rows(scene.labels.shape[0], config.holdout_fraction)
    loss_fn = LOSSES[config.loss]
    model = UNet(scene.features.shape[0], config.base_filters)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, factor=0.5, patience=2)
    ckpt = out_dir / "checkpoint.pt"
    start_epoch, best, stale = 0, float("inf"), 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start_epoch, best, stale = state["epoch"] + 1, state["best"], state["stale"]
        rng = np.random.default_rng(config.seed + start_epoch)
        LOGGER.info("resumed from %s at epoch %d", ckpt, start_epoch)
    val_rng = np.random.default_rng(config.seed + 10_000)
    val_batches = [
        sample_batch(scene, hold_rows, config.crop, config.batch_size, val_rng) for _ in range(4)
    ]
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    metrics_path = out_dir / "metrics.csv"
    started = time.monotonic()
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    for epoch in range(start_epoch, config.max_epochs):
        model.train()
        losses = []
        bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch}", leave=False)
        for _ in bar:
            x, y = sample_batch(scene, train_rows, config.crop, config.batch_size, rng)
            loss = loss_fn(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        model.eval()
        with torch.no_grad():
            val = float(np.mean([loss_fn(model(x), y).item() for x, y in val_batches]))
        scheduler.step(val)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": val,
            "lr": optimiser.param_groups[0]["lr"],
            "minutes": (time.monotonic() - started) / 60,
        }
        with metrics_path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        tqdm.write(f"epoch {epoch}: train {row['train_loss']:.4f} val {val:.4f} lr {row['lr']:.1e}")
        if val < best:
            best, stale = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        torch.save(
            {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "epoch": epoch,
                "best": best,
                "stale": stale,
            },
            ckpt,
        )
        if stale >= config.patience or (time.monotonic() - started) / 60 > config.max_minutes:
            break
    model.load_state_dict(best_state)
    hold = scene.features[:, hold_rows]
    result = agreement(predict(model, hold), scene.labels[hold_rows])
    (out_dir / "holdout.json").write_text(json.dumps(result, indent=2))
    return model, result


def feature_defaults(level: str) -> tuple[Sequence[str], Sequence[float]]:
    """The feature list and max_v the trained model expects."""
    return DEFAULT_FEATURES[level], DEFAULT_MAX_V[level]
