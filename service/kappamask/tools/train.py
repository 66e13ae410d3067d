"""Training of the KappaMask U-Net (paper §2.3), seeded and resumable.

Adam, generalised dice loss with UNDEFINED excluded, learning rate reduced on plateau,
early stopping on validation loss, flips and 90 degree rotations, 80/20 split. Data come
from one or more sources (``datasets``): a product with Sen2Cor SCL or a label raster,
synthetic composites over a product, or a KappaSet-style folder.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V
from kappamask.errors import InvalidInputError
from kappamask.tools.datasets import (
    Batch,
    CompositeSource,
    KappaSetSource,
    Scene,
    SceneSource,
    Source,
    read_label_raster,
)
from kappamask.tools.losses import LOSSES
from kappamask.tools.metrics import CLASSES, agreement, confusion_matrix, scores
from kappamask.tools.unet import UNet

LOGGER = logging.getLogger(__name__)

#: What ``TrainConfig.labels`` may name (or ``labels:PATH`` for a mask-code GeoTIFF).
LABEL_SOURCES = ("scl", "composites", "scl+composites", "kappaset")
#: Fixed synthetic crops of the held-out block on which composites are scored.
HOLDOUT_COMPOSITES = 16


@dataclass
class FitConfig:
    """How the weights are fitted, whatever the data (``train`` and ``distill``)."""

    crop: int = 256
    batch_size: int = 4
    steps_per_epoch: int = 50
    max_epochs: int = 30
    max_minutes: float = 20.0
    learning_rate: float = 1e-3
    loss: str = "gdl"
    patience: int = 6
    #: Epochs without a better validation loss before the learning rate is halved.
    lr_patience: int = 2
    #: Validation crops per source, in batches.
    val_batches: int = 2
    seed: int = 0
    #: bfloat16 autocast on the CPU: twice as fast where AMX / AVX512-BF16 exist; the
    #: weights and the optimiser stay float32.
    bf16: bool = False
    #: Largest gradient norm of a step (None: unclipped). Without normalisation layers the
    #: network's activations grow step by step, and one large step can kill a channel of
    #: the head's two-channel ReLU layer for good.
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    """Everything that decides a training run (written next to its outputs)."""

    product: str
    level: str = "L2A"
    labels: str = "scl"
    resolution: int = 60
    base_filters: int = 32
    holdout_fraction: float = 0.2
    fit: FitConfig = field(default_factory=FitConfig)


def build_sources(config: TrainConfig) -> list[Source]:
    """The sources ``config.labels`` names, on ``config.product`` (a SAFE or a folder)."""
    features, max_v = DEFAULT_FEATURES[config.level], DEFAULT_MAX_V[config.level]
    if config.labels == "kappaset":
        return [
            KappaSetSource(
                Path(config.product), features, max_v, config.holdout_fraction, config.fit.seed
            )
        ]
    if config.labels not in LABEL_SOURCES and not config.labels.startswith("labels:"):
        raise InvalidInputError(f"labels must be one of {LABEL_SOURCES} or labels:PATH")
    scene = Scene.load(config.product, features, max_v, config.resolution)
    sources: list[Source] = []
    if config.labels.startswith("labels:"):
        raster = read_label_raster(Path(config.labels.removeprefix("labels:")), scene.grid)
        sources.append(SceneSource(scene, raster, config.holdout_fraction, "labels"))
    scl = None
    if "scl" in config.labels.split("+"):
        scl_source = SceneSource.with_scl(scene, config.holdout_fraction)
        scl = scl_source.labels
        sources.append(scl_source)
    if "composites" in config.labels.split("+"):
        # over an L2A product with SCL: synthetic clouds over its clear areas only
        sources.append(CompositeSource(scene, config.holdout_fraction, base_labels=scl))
    return sources


def _stack(crops: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([c[0] for c in crops])
    y = np.stack([c[1] for c in crops]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def sample_batch(
    sources: Sequence[Source], crop: int, batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` training crops, each from a source drawn at random."""
    picks = rng.integers(0, len(sources), batch)
    return _stack([sources[int(i)].train_crop(crop, rng) for i in picks])


def predict(model: UNet, features: np.ndarray) -> np.ndarray:
    """Mask codes for a whole [C, H, W] array (padded to a multiple of 16)."""
    _c, h, w = features.shape
    ph, pw = -h % 16, -w % 16
    x = torch.from_numpy(np.pad(features, ((0, 0), (0, ph), (0, pw))))[None]
    model.eval()
    with torch.no_grad():
        probs = model(x)[0, 1:5, :h, :w].numpy()
    # as the served graph does: MISSING where there is no data, else the best real class
    codes = np.array([int(c) for c in CLASSES], dtype=np.uint8)
    result: np.ndarray = np.where((features == 0).all(axis=0), 0, codes[probs.argmax(0)])
    return result.astype(np.uint8)


def holdout_report(model: UNet, sources: Sequence[Source], config: TrainConfig) -> dict[str, Any]:
    """Agreement on each source's held-out part: the whole block for a label raster,
    fixed composites of the held-out rows, the held-out KappaSet sub-tiles."""
    report: dict[str, Any] = {}
    for source in sources:
        if isinstance(source, SceneSource):
            feats, labels = source.holdout()
            report[source.name] = agreement(predict(model, feats), labels)
        else:
            crops = source.validation_crops(
                config.fit.crop, HOLDOUT_COMPOSITES, config.fit.seed + 20_000
            )
            preds = [predict(model, f) for f, _l in crops]
            report[source.name] = agreement(
                np.concatenate([p.ravel() for p in preds]),
                np.concatenate([lab.ravel() for _f, lab in crops]),
            )
    return report


def _head_alive(model: UNet, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Share of the head's two ReLU channels that are positive somewhere in ``batches``
    (a channel at 0 everywhere passes no gradient: it never comes back)."""
    seen: list[torch.Tensor] = []
    hook = model.layer("head.conv1").register_forward_hook(
        lambda _m, _i, out: seen.append((out > 0).any(dim=(0, 2, 3)))
    )
    try:
        with torch.no_grad():
            for x, _y in batches:
                model(x)
    finally:
        hook.remove()
    return float(torch.stack(seen).any(dim=0).float().mean()) if seen else 1.0


def _epoch_dice(
    model: UNet, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    matrix = sum(
        confusion_matrix(np.stack([predict(model, x[i].numpy()) for i in range(len(x))]), y.numpy())
        for x, y in batches
    )
    classes = scores(np.asarray(matrix))["classes"]
    return {f"dice_{name}": float(v["dice"]) for name, v in classes.items()}


def fit(model: UNet, sources: Sequence[Source], fit_config: FitConfig, out_dir: Path) -> UNet:
    """Fit ``model`` on crops of ``sources``; validation on their held-out crops; best
    weights by validation loss. Writes checkpoint.pt (resumed from) and metrics.csv."""
    config = fit_config
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    loss_fn = LOSSES[config.loss]
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, factor=0.5, patience=config.lr_patience
    )
    ckpt = out_dir / "checkpoint.pt"
    start_epoch, best, stale = 0, float("inf"), 0
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        best_state = state["best_model"]
        start_epoch, best, stale = state["epoch"] + 1, state["best"], state["stale"]
        rng = np.random.default_rng(config.seed + start_epoch)
        LOGGER.info("resumed from %s at epoch %d", ckpt, start_epoch)
    val_batches = []
    for i, source in enumerate(sources):
        crops = source.validation_crops(
            config.crop, config.val_batches * config.batch_size, config.seed + 10_000 + i
        )
        val_batches += [
            _stack(crops[j : j + config.batch_size])
            for j in range(0, len(crops), config.batch_size)
        ]

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            out: torch.Tensor = model(x).float()
        return out

    metrics_path = out_dir / "metrics.csv"
    started = time.monotonic()
    epochs = tqdm(range(start_epoch, config.max_epochs), desc="training", unit="epoch")
    for epoch in epochs:
        model.train()
        losses = []
        steps = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch}", leave=False)
        for _ in steps:
            x, y = sample_batch(sources, config.crop, config.batch_size, rng)
            loss = loss_fn(forward(x), y)
            optimiser.zero_grad()
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimiser.step()
            losses.append(loss.item())
            steps.set_postfix(loss=f"{np.mean(losses):.4f}")
        model.eval()
        with torch.no_grad():
            val = float(np.mean([loss_fn(forward(x), y).item() for x, y in val_batches]))
        dice = _epoch_dice(model, val_batches)
        alive = _head_alive(model, val_batches)
        if alive < 1.0:
            LOGGER.warning(
                "epoch %d: %.0f %% of the head's ReLU channels are dead", epoch, 100 * (1 - alive)
            )
        scheduler.step(val)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": val,
            **dice,
            "head_alive": alive,
            "lr": optimiser.param_groups[0]["lr"],
            "minutes": (time.monotonic() - started) / 60,
        }
        with metrics_path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        epochs.set_postfix(
            loss=f"{row['train_loss']:.3f}",
            val=f"{val:.3f}",
            dice=" ".join(f"{v:.2f}" for v in dice.values()),
        )
        if val < best:
            best, stale = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        torch.save(
            {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best_model": best_state,
                "epoch": epoch,
                "best": best,
                "stale": stale,
            },
            ckpt,
        )
        if stale >= config.patience or (time.monotonic() - started) / 60 > config.max_minutes:
            reason = "no better validation loss" if stale >= config.patience else "time"
            LOGGER.info("stopping after epoch %d (%s)", epoch, reason)
            break
    model.load_state_dict(best_state)
    return model


def train(config: TrainConfig, out_dir: Path) -> tuple[UNet, dict[str, Any]]:
    """Train per ``config``; writes checkpoint.pt, metrics.csv and holdout.json in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = build_sources(config)
    torch.manual_seed(config.fit.seed)
    model = UNet(len(DEFAULT_FEATURES[config.level]), config.base_filters, batch_norm=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    fit(model, sources, config.fit, out_dir)
    result = holdout_report(model, sources, config)
    (out_dir / "holdout.json").write_text(json.dumps(result, indent=2))
    return model, result


def feature_defaults(level: str) -> tuple[Sequence[str], Sequence[float]]:
    """The feature list and max_v the trained model expects."""
    return DEFAULT_FEATURES[level], DEFAULT_MAX_V[level]
