"""Training data: where crops of (features, labels) come from.

- ``SceneSource``: one product on one grid with a label raster on the same grid (Sen2Cor
  SCL mapped by the paper's Table 1, or any mask-code GeoTIFF).
- ``CompositeSource``: the same product's clear pixels under synthetic clouds, cirrus
  and shadows with exact labels (``composites.compose``), drawn anew for every crop.
- ``KappaSetSource``: a KappaSet-style folder, one NetCDF per 512 x 512 sub-tile with one
  variable per band (digital numbers) and a ``Label`` variable in mask codes.

Each source gives random training crops from its training part and fixed validation
crops from its held-out part (a block of rows, or 20 % of the sub-tiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
from rasterio.windows import Window

from kappamask.bands import DN_SCALE, MaskClass
from kappamask.errors import InvalidInputError, ProductError
from kappamask.geometry.grid import Grid, output_grid
from kappamask.reading.reader import BandReader
from kappamask.sources import open_safe
from kappamask.sources.product import Product
from kappamask.tools.composites import compose
from kappamask.tools.labels import read_nearest, read_scl_labels

Batch = tuple[np.ndarray, np.ndarray]


class Source(Protocol):
    """Something training can draw labelled crops from."""

    name: str

    def train_crop(self, crop: int, rng: np.random.Generator) -> Batch: ...

    def validation_crops(self, crop: int, count: int, seed: int) -> list[Batch]: ...


def augment(features: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Batch:
    """A random one of the 8 flips/90-degree rotations, applied to both."""
    k = int(rng.integers(0, 4))
    features, labels = np.rot90(features, k, axes=(1, 2)), np.rot90(labels, k)
    if rng.random() < 0.5:
        features, labels = features[:, :, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(features), np.ascontiguousarray(labels)


@dataclass
class Scene:
    """A product's normalised features [C, H, W] and validity on one grid."""

    product: Product
    grid: Grid
    features: np.ndarray
    valid: np.ndarray
    feature_names: tuple[str, ...]
    max_v: tuple[float, ...]

    @classmethod
    def load(
        cls, path: str | Path, features: Sequence[str], max_v: Sequence[float], resolution: int
    ) -> Scene:
        product = open_safe(path)
        grid = output_grid(product, resolution)
        with BandReader(product, features, max_v, grid) as reader:
            values, valid = reader.read(Window(0, 0, grid.width, grid.height))
        return cls(product, grid, values, valid, tuple(features), tuple(max_v))

    def rows(self, holdout_fraction: float) -> tuple[slice, slice]:
        """Train on the top rows, hold out the bottom block (no leakage but the seam)."""
        cut = round(self.grid.height * (1.0 - holdout_fraction))
        return slice(0, cut), slice(cut, self.grid.height)


def _random_window(rows: slice, width: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    y0 = rows.start + int(rng.integers(0, rows.stop - rows.start - crop + 1))
    return y0, int(rng.integers(0, width - crop + 1))


def read_label_raster(path: Path, grid: Grid) -> np.ndarray:
    """A mask-code GeoTIFF on ``grid`` (nearest neighbour), e.g. a hand-made label."""
    labels = read_nearest(path, grid, nodata=MaskClass.MISSING)
    if labels.max() > MaskClass.UNDEFINED:
        raise ProductError(f"{path} holds values above {int(MaskClass.UNDEFINED)}: not mask codes")
    return labels.astype(np.uint8)


class _SplitSource:
    """Training crops from the training part, fixed validation crops from the held-out
    part; subclasses say how to cut a crop from a part."""

    train_part: Any
    hold_part: Any

    def _crop(self, part: Any, crop: int, rng: np.random.Generator) -> Batch:
        raise NotImplementedError

    def train_crop(self, crop: int, rng: np.random.Generator) -> Batch:
        return self._crop(self.train_part, crop, rng)

    def validation_crops(self, crop: int, count: int, seed: int) -> list[Batch]:
        rng = np.random.default_rng(seed)
        return [self._crop(self.hold_part, crop, rng) for _ in range(count)]


class SceneSource(_SplitSource):
    """Crops of a scene with a fixed label raster (SCL or a label GeoTIFF)."""

    def __init__(self, scene: Scene, labels: np.ndarray, holdout_fraction: float, name: str):
        self.scene, self.name = scene, name
        self.labels = labels.copy()
        self.labels[~scene.valid] = MaskClass.MISSING
        self.train_part, self.hold_part = scene.rows(holdout_fraction)

    @classmethod
    def with_scl(cls, scene: Scene, holdout_fraction: float) -> SceneSource:
        return cls(scene, read_scl_labels(scene.product, scene.grid), holdout_fraction, "scl")

    def _crop(self, rows: slice, crop: int, rng: np.random.Generator) -> Batch:
        while True:
            y0, x0 = _random_window(rows, self.scene.grid.width, crop, rng)
            labels = self.labels[y0 : y0 + crop, x0 : x0 + crop]
            if (labels == MaskClass.MISSING).mean() <= 0.9:  # empty swath teaches nothing
                feats = self.scene.features[:, y0 : y0 + crop, x0 : x0 + crop]
                return augment(feats, labels, rng)

    def holdout(self) -> Batch:
        """The whole held-out block: features and reference labels."""
        return self.scene.features[:, self.hold_part], self.labels[self.hold_part]


class CompositeSource(_SplitSource):
    """Synthetic clouds over a scene's pixels, drawn anew per crop.

    Without ``base_labels`` the scene is taken as clear (a cloud-free scene). With them
    (SCL of the same product), crops are taken where at least ``min_clear`` of the pixels
    are clear, and a pixel that is not clear underneath keeps its own label where no
    synthetic cloud covers it, becomes CLOUD under opaque synthetic cloud, and is left
    out (UNDEFINED) under thin cloud or shadow, where the truth is not known.
    """

    name = "composites"

    def __init__(
        self,
        scene: Scene,
        holdout_fraction: float,
        base_labels: np.ndarray | None = None,
        min_clear: float = 0.7,
    ):
        self.scene, self.base_labels, self.min_clear = scene, base_labels, min_clear
        self.train_part, self.hold_part = scene.rows(holdout_fraction)

    def _crop(self, rows: slice, crop: int, rng: np.random.Generator) -> Batch:
        s = self.scene
        base = None
        while True:
            y0, x0 = _random_window(rows, s.grid.width, crop, rng)
            valid = s.valid[y0 : y0 + crop, x0 : x0 + crop]
            if self.base_labels is not None:
                base = self.base_labels[y0 : y0 + crop, x0 : x0 + crop]
                if (base == MaskClass.CLEAR).mean() < self.min_clear:
                    continue
            if valid.mean() > 0.1:
                break
        feats, labels = compose(
            s.features[:, y0 : y0 + crop, x0 : x0 + crop],
            valid,
            s.feature_names,
            s.max_v,
            rng,
            sun_azimuth=s.product.sun_azimuth,
            sun_zenith=s.product.sun_zenith,
        )
        if base is not None:
            cloudy_below = valid & (base != MaskClass.CLEAR)
            keep_own = cloudy_below & (labels == MaskClass.CLEAR)
            unknown = cloudy_below & (labels != MaskClass.CLEAR) & (labels != MaskClass.CLOUD)
            labels[keep_own] = base[keep_own]
            labels[unknown] = MaskClass.UNDEFINED
        return augment(feats, labels, rng)


class KappaSetSource(_SplitSource):
    """A folder of KappaSet-style NetCDF sub-tiles, 80 % for training, 20 % held out."""

    name = "kappaset"

    def __init__(
        self,
        folder: Path,
        features: Sequence[str],
        max_v: Sequence[float],
        holdout_fraction: float,
        seed: int,
    ):
        files = sorted(Path(folder).glob("*.nc"))
        if not files:
            raise InvalidInputError(f"{folder} holds no .nc sub-tiles")
        order = np.random.default_rng(seed).permutation(len(files))
        cut = max(1, round(len(files) * (1 - holdout_fraction))) if len(files) > 1 else 1
        self.train_part = [files[i] for i in order[:cut]]
        self.hold_part = [files[i] for i in order[cut:]] or self.train_part
        self.features, self.max_v = tuple(features), np.asarray(max_v, np.float32)

    def read(self, path: Path) -> Batch:
        """Normalised features [C, H, W] and labels [H, W] of one sub-tile."""
        with h5py.File(path, "r") as nc:
            names = {k.lower(): k for k in nc}
            missing = [f for f in self.features if f.lower() not in names]
            if missing or "label" not in names:
                raise ProductError(
                    f"{path.name} lacks {', '.join(missing) or 'the Label variable'}"
                )
            dn = np.stack([np.asarray(nc[names[f.lower()]], np.float32) for f in self.features])
            labels = np.asarray(nc[names["label"]]).astype(np.uint8)
        values = np.maximum(dn / DN_SCALE / self.max_v[:, None, None], 0.0).astype(np.float32)
        return values, labels

    def _crop(self, files: Sequence[Path], crop: int, rng: np.random.Generator) -> Batch:
        feats, labels = self.read(files[int(rng.integers(0, len(files)))])
        _c, h, w = feats.shape
        y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        return augment(
            feats[:, y0 : y0 + crop, x0 : x0 + crop], labels[y0 : y0 + crop, x0 : x0 + crop], rng
        )
