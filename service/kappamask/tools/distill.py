"""Bootstrap weights distilled from teachers on real imagery (``kappamask distill``).

1. Every scene given is read (``realdata``), labelled by the teachers (``teachers``) and
   cached as ``scenes/<name>.npz`` in the output folder (the teachers are slow; a resumed
   or repeated run reuses them).
2. Scenes whose name or group contains a ``--holdout`` pattern are never trained on: whole
   acquisitions are held out, never blocks of a training scene.
3. The U-Net is fitted on random crops of the training scenes (``train.fit``).
4. ``holdout.json``: on the held-out scenes, per-class agreement of the model with each
   teacher and with the fused labels, next to the teachers' agreement with each other on
   the same pixels (the bar a distilled model can reach).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kappamask.bands import DEFAULT_FEATURES, MaskClass
from kappamask.errors import InvalidInputError
from kappamask.tools import realdata
from kappamask.tools.datasets import Batch, augment
from kappamask.tools.metrics import TrustCounts, agreement
from kappamask.tools.realdata import Imagery, Labelled
from kappamask.tools.train import FitConfig, fit, predict
from kappamask.tools.unet import UNet

LOGGER = logging.getLogger(__name__)

#: A crop is drawn again when fewer than this share of its pixels carry a label.
MIN_LABELLED = 0.1
MAX_ATTEMPTS = 50
#: The held-out report's acquisition kinds (``Labelled.cloud_free``). A teacher's shadow
#: in an acquisition published as cloud-free cannot be a cloud's (ukis-csmask calls
#: terrain shading and dark forest shadow): pooled with the cloudy ones, its recall
#: would reward a model for painting dark ground.
ACQUISITION_KINDS = {
    True: "cloud-free acquisitions",
    False: "other acquisitions",
    None: "kind not recorded",
}


@dataclass
class DataInputs:
    """Where the real imagery is (each a user-supplied path; any may be empty)."""

    multiband: list[Path] = field(default_factory=list)  # folders of 13-band L1C GeoTIFFs
    band_folders: list[tuple[str, Path]] = field(default_factory=list)  # (level, folder)
    safes: list[tuple[int, Path]] = field(default_factory=list)  # (resolution, SAFE)
    npy: list[Path] = field(default_factory=list)  # eo-learn REFERENCE_SCENES.npy
    mat: list[Path] = field(default_factory=list)  # DSen2 .mat scenes (cloud-free, no B10)

    def imagery(self) -> Iterable[Imagery]:
        for folder in self.multiband:
            for path in sorted(Path(folder).rglob("*.tif")):
                yield realdata.read_multiband(path)
        for level, folder in self.band_folders:
            yield realdata.read_band_folder(Path(folder), level)
        for resolution, safe in self.safes:
            yield realdata.read_safe(Path(safe), resolution)
        for path in self.npy:
            yield from realdata.read_npy_scenes(Path(path))
        for path in self.mat:
            yield realdata.read_dsen2_mat(Path(path))


@dataclass
class DistillConfig:
    """Everything that decides a distillation run (written next to its outputs)."""

    level: str
    holdout: tuple[str, ...] = ()
    base_filters: int = 16
    #: Channels of the head's ReLU layer (the paper's 2 die in training: architecture.py).
    head_channels: int = 16
    pseudo_l2a: bool = True  # L2A: add L1C scenes brought near BOA (realdata.pseudo_l2a)
    #: Share of training crops whose clear ground becomes desert (realdata.bare_ground_crop):
    #: the real scenes here hold almost no bare ground.
    bare_ground: float = 0.2
    #: Share of training crops whose clear ground becomes open water
    #: (realdata.open_water_crop): little open sea in the real scenes, none at 20 m in L2A.
    open_water: float = 0.15
    fit: FitConfig = field(
        default_factory=lambda: FitConfig(
            crop=128,
            batch_size=8,
            steps_per_epoch=200,
            max_epochs=200,
            max_minutes=35.0,
            learning_rate=1e-3,
            loss="ce+bce",
            patience=8,
            lr_patience=3,
            val_batches=6,
            bf16=True,
            grad_clip=1.0,
        )
    )


def save_scene(scene: Labelled, path: Path) -> None:
    np.savez_compressed(
        path,
        features=scene.features,
        labels=scene.labels,
        meta=json.dumps([scene.name, scene.group, scene.level, scene.cloud_free]),
        **{f"teacher_{k}": v for k, v in scene.teacher_masks.items()},
    )


def _meta(z: Any) -> tuple[str, str, str, bool | None]:
    # caches written before the cloud-free flag was recorded hold three items
    name, group, level, *cloud_free = json.loads(str(z["meta"]))
    return name, group, level, next(iter(cloud_free), None)


def scene_identity(path: Path) -> tuple[str, str]:
    """A cached scene's name and acquisition group, without reading its pixels."""
    with np.load(path) as z:
        name, group, _level, _cloud_free = _meta(z)
    return name, group


def load_scene(path: Path) -> Labelled:
    with np.load(path) as z:
        name, group, level, cloud_free = _meta(z)
        masks = {k.removeprefix("teacher_"): z[k] for k in z.files if k.startswith("teacher_")}
        return Labelled(name, group, level, z["features"], z["labels"], masks, cloud_free)


def labelled_scenes(
    inputs: DataInputs, level: str, cache: Path, pseudo_l2a: bool = True, seed: int = 0
) -> list[Labelled]:
    """Every usable scene of ``inputs`` labelled for a model of ``level`` (cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = []
    # one scene in memory at a time: the readers run lazily as the loop asks for them
    for img in tqdm(inputs.imagery(), desc=f"teachers ({level})", unit="scene"):
        path = cache / f"{level}_{img.name}.npz"
        if path.exists():
            scenes.append(load_scene(path))
            continue
        if level == "L1C" and img.level != "L1C":
            continue
        if level == "L2A" and img.level != "L2A":
            if not pseudo_l2a:
                continue
            l1c_path = cache / f"L1C_{img.name}.npz"  # the same clouds: reuse their labels
            l1c_labels = (
                load_scene(l1c_path).labels
                if l1c_path.exists()
                else realdata.teacher_labels(img, "L1C")[0]
            )
            scene = realdata.label(realdata.pseudo_l2a(img, rng), "L2A", l1c_labels)
        elif level == "L2A" and img.scl is None:
            LOGGER.warning("%s: L2A without SCL, left out", img.name)
            continue
        else:
            scene = realdata.label(img, level)
        save_scene(scene, path)
        scenes.append(scene)
    if not scenes:
        raise InvalidInputError(f"no scene of the inputs can train an {level} model")
    return scenes


class ScenesSource:
    """Random crops of whole scenes, drawn in proportion to their labelled pixels; the
    validation crops are drawn the same way with their own seed (for early stopping only:
    held-out scenes are never passed here)."""

    name = "scenes"

    def __init__(
        self, scenes: Sequence[Labelled], bare_ground: float = 0.0, open_water: float = 0.0
    ):
        self.scenes = list(scenes)
        self.bare_ground, self.open_water = bare_ground, open_water
        weights = np.array([float(_labelled(s.labels).sum()) for s in self.scenes])
        if not weights.sum():
            raise InvalidInputError("no labelled pixel in the training scenes")
        self.p = weights / weights.sum()

    def _crop(self, rng: np.random.Generator, crop: int) -> Batch:
        for attempt in range(MAX_ATTEMPTS):
            scene = self.scenes[int(rng.choice(len(self.scenes), p=self.p))]
            feats, labels = _pad(scene.features, scene.labels, crop)
            _c, h, w = feats.shape
            y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            lab = labels[y0 : y0 + crop, x0 : x0 + crop]
            # a crop almost without labels teaches nothing; the last attempt is taken anyway
            if _labelled(lab).mean() >= MIN_LABELLED or attempt == MAX_ATTEMPTS - 1:
                break
        cut = feats[:, y0 : y0 + crop, x0 : x0 + crop]
        draw = rng.random()
        if draw < self.bare_ground:
            cut = realdata.bare_ground_crop(cut, lab, scene.level, rng)
        elif draw < self.bare_ground + self.open_water:
            cut = realdata.open_water_crop(cut, lab, scene.level, rng)
        return augment(cut, lab, rng)

    def train_crop(self, crop: int, rng: np.random.Generator) -> Batch:
        return self._crop(rng, crop)

    def validation_crops(self, crop: int, count: int, seed: int) -> list[Batch]:
        rng = np.random.default_rng(seed)
        return [self._crop(rng, crop) for _ in range(count)]


def _labelled(labels: np.ndarray) -> np.ndarray:
    labelled: np.ndarray = (labels != MaskClass.UNDEFINED) & (labels != MaskClass.MISSING)
    return labelled


def _pad(feats: np.ndarray, labels: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    ph, pw = max(0, crop - labels.shape[0]), max(0, crop - labels.shape[1])
    if ph or pw:
        feats = np.pad(feats, ((0, 0), (0, ph), (0, pw)))
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=MaskClass.MISSING)
    return feats, labels


def held_out(name: str, group: str, holdout: Sequence[str]) -> bool:
    """Whether ``--holdout`` patterns hold a scene out: its name or its acquisition group
    (a SEN12MS-CR pair's clear and cloudy patches share the group ``ROIs1970_fall_85``,
    which neither file name contains) matches one."""
    return realdata.matches(name, holdout) or realdata.matches(group, holdout)


def split(
    scenes: Sequence[Labelled], holdout: Sequence[str]
) -> tuple[list[Labelled], list[Labelled]]:
    """(training, held-out) by whole scene: held out where name or group matches."""
    held = [s for s in scenes if held_out(s.name, s.group, holdout)]
    train = [s for s in scenes if s not in held]
    held_groups = {s.group for s in held}
    leaked = [s.name for s in train if s.group in held_groups]
    if leaked:
        raise InvalidInputError(f"held-out acquisitions also in training: {', '.join(leaked)}")
    if not train:
        raise InvalidInputError("every scene is held out: nothing left to train on")
    return train, held


def holdout_report(
    held: Sequence[Labelled], classify: Callable[[np.ndarray], np.ndarray]
) -> dict[str, Any]:
    """Agreement on the held-out scenes: the model (``classify``: features -> classes)
    against each teacher and against the fused labels; every teacher against every other
    teacher (same pixels); and what a user sees (``metrics.TrustCounts``: clear ground
    kept clear, shadow share, cloud dice per teacher, shadow recall), over all the scenes
    and by acquisition kind (``ACQUISITION_KINDS``)."""
    preds = [classify(s.features) for s in held]
    by_kind: dict[str, TrustCounts] = {}
    for s, pred in zip(held, preds, strict=True):
        kind = ACQUISITION_KINDS[s.cloud_free]
        by_kind.setdefault(kind, TrustCounts()).add(pred, s.teacher_masks)
    names = sorted({k for s in held for k in s.teacher_masks})
    columns: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for s, pred in zip(held, preds, strict=True):
        columns.setdefault("model vs fused labels", []).append((pred, s.labels))
        for ref in names:
            if ref not in s.teacher_masks:
                continue
            columns.setdefault(f"model vs {ref}", []).append((pred, s.teacher_masks[ref]))
            for other in names:
                if other != ref and other in s.teacher_masks:
                    columns.setdefault(f"{other} vs {ref}", []).append(
                        (s.teacher_masks[other], s.teacher_masks[ref])
                    )
    report: dict[str, Any] = {"scenes": [s.name for s in held]}
    for key, pairs in columns.items():
        report[key] = agreement(
            np.concatenate([p.ravel() for p, _ in pairs]),
            np.concatenate([r.ravel() for _, r in pairs]),
        )
    report["trust"] = TrustCounts.pooled(by_kind.values()).report()
    report["trust_by_acquisition"] = {kind: t.report() for kind, t in sorted(by_kind.items())}
    return report


def distill(
    inputs: DataInputs, config: DistillConfig, out_dir: Path, cache: Path | None = None
) -> tuple[UNet, dict[str, Any]]:
    """Label (teachers' labels cached in ``cache``, default ``out_dir/scenes``: runs of
    both levels may share one), split, fit; writes config.json, holdout.json and the
    fitting outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes = labelled_scenes(
        inputs, config.level, cache or out_dir / "scenes", config.pseudo_l2a, config.fit.seed
    )
    train_scenes, held = split(scenes, config.holdout)
    (out_dir / "config.json").write_text(
        json.dumps(
            {
                **asdict(config),
                "train_scenes": [s.name for s in train_scenes],
                "holdout_scenes": [s.name for s in held],
            },
            indent=2,
            default=str,
        )
    )
    LOGGER.info("%d training scenes, %d held out", len(train_scenes), len(held))
    torch.manual_seed(config.fit.seed)
    model = UNet(
        len(DEFAULT_FEATURES[config.level]),
        config.base_filters,
        batch_norm=True,
        head_channels=config.head_channels,
    )
    source = ScenesSource(train_scenes, config.bare_ground, config.open_water)
    fit(model, [source], config.fit, out_dir)
    report = holdout_report(held, lambda f: predict(model, f)) if held else {}
    (out_dir / "holdout.json").write_text(json.dumps(report, indent=2, default=float))
    return model, report
