"""A review folder (``kappamask review --out DIR``) as the labelling tools see it: its
ranked sub-tiles, their files, and the label rasters people made of them.

A label raster is ``labels/{sub-tile}_labels.tif``: uint8 mask codes on the sub-tile's
own grid (the CRS and transform of its band stack), ``UNDEFINED`` (5) where nobody
labelled, a colour table for GIS viewers and tags saying where the labels came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from kappamask.bands import CLASS_COLORS, MaskClass
from kappamask.errors import InvalidInputError
from kappamask.writers.preview import OVERLAY

INDEX_FILE = "index.json"
LABELS_DIR = "labels"
#: The codes a label raster may hold: the five classes and "not labelled".
LABEL_CODES = frozenset(int(c) for c in MaskClass)
#: Each class's colour in the labelling tools: the review overlays' tints (a white cloud
#: brush would vanish over white cloud), clear in the service's green, and missing dark
#: grey, because black means "not labelled" in a CVAT/VOC mask.
LABEL_COLOURS: dict[int, tuple[int, int, int]] = {
    int(MaskClass.MISSING): (64, 64, 64),
    int(MaskClass.CLEAR): CLASS_COLORS[MaskClass.CLEAR][:3],
    **{int(code): rgb for code, rgb in OVERLAY.items()},
}


@dataclass(frozen=True)
class ReviewedTile:
    """One sub-tile of a review: its rank and files (absolute paths)."""

    name: str
    rank: int
    product_id: str
    unsure: float
    bands: Path
    mask: Path
    rgb: Path
    overlay: Path

    def read_mask(self) -> np.ndarray:
        """The model's classes on the sub-tile (the pre-annotation)."""
        with rasterio.open(self.mask) as src:
            mask: np.ndarray = src.read(1)
        return mask

    @property
    def shape(self) -> tuple[int, int]:
        with rasterio.open(self.bands) as src:
            return src.height, src.width


def _name(name: str, index: Path) -> str:
    """A sub-tile name, which names the files of its labels: a file name, no path."""
    if not name or Path(name).name != name or name.startswith("."):
        raise InvalidInputError(f"{index}: {name!r} is not a sub-tile name")
    return name


def _inside(root: Path, relative: str, index: Path) -> Path:
    """A file the index names, which must lie inside the review folder."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InvalidInputError(f"{index} names {relative!r}, outside the review folder")
    return path


class ReviewFolder:
    """The sub-tiles ``kappamask review`` wrote into ``root``, most unsure first."""

    def __init__(self, root: Path) -> None:
        index = root / INDEX_FILE
        try:
            document = json.loads(index.read_text())
            self.tiles = [
                ReviewedTile(
                    _name(e["name"], index),
                    int(e["rank"]),
                    e["product_id"],
                    float(e["unsure"]),
                    *(
                        _inside(root, e["files"][k], index)
                        for k in ("bands", "mask", "rgb", "overlay")
                    ),
                )
                for e in document["sub_tiles"]
            ]
        except FileNotFoundError:
            raise InvalidInputError(
                f"{root} holds no {INDEX_FILE}: give a folder `kappamask review` wrote"
            ) from None
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidInputError(f"{index} is not a review index: {err}") from err
        self.root = root
        self.model: str = str(document.get("model", ""))
        self._by_name = {t.name: t for t in self.tiles}

    def level(self) -> str:
        """The level of the model that reviewed (its sub-tiles' band stacks say it)."""
        for tile in self.tiles:
            with rasterio.open(tile.bands) as src:
                level = str(src.tags().get("level", ""))
            if level:
                return level
        raise InvalidInputError(f"the review {self.root} does not say its level: give --parent")

    def tile(self, name: str) -> ReviewedTile:
        try:
            return self._by_name[name]
        except KeyError:
            raise InvalidInputError(f"{name} is not a sub-tile of the review {self.root}") from None

    def label_path(self, name: str) -> Path:
        return self.root / LABELS_DIR / f"{name}_labels.tif"

    def write_labels(self, name: str, labels: np.ndarray, tags: Mapping[str, str]) -> Path:
        """Write sub-tile ``name``'s label raster, georeferenced like its band stack; a
        raster of another size or with codes that are not mask codes is refused. Written
        to a side file first: a reader never sees half a raster."""
        tile = self.tile(name)
        with rasterio.open(tile.bands) as src:
            profile = {
                "crs": src.crs,
                "transform": src.transform,
                "width": src.width,
                "height": src.height,
            }
        if labels.shape != (profile["height"], profile["width"]):
            raise InvalidInputError(
                f"{name}: labels of {labels.shape[1]} x {labels.shape[0]} px for a sub-tile "
                f"of {profile['width']} x {profile['height']}"
            )
        unknown = sorted(set(np.unique(labels).tolist()) - LABEL_CODES)
        if unknown:
            raise InvalidInputError(f"{name}: {unknown} are not mask codes")
        path = self.label_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with rasterio.open(
            partial, "w", driver="GTiff", count=1, dtype="uint8", compress="deflate", **profile
        ) as dst:
            dst.write(labels.astype(np.uint8)[None])
            dst.write_colormap(1, {**CLASS_COLORS, int(MaskClass.UNDEFINED): (255, 0, 255, 0)})
            dst.update_tags(**tags)
        os.replace(partial, path)
        return path

    def labelled(self) -> list[tuple[ReviewedTile, Path]]:
        """The sub-tiles that have a label raster, in rank order."""
        return [
            (t, self.label_path(t.name)) for t in self.tiles if self.label_path(t.name).exists()
        ]


def read_labels(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A label raster's codes and tags."""
    with rasterio.open(path) as src:
        labels: np.ndarray = src.read(1)
        return labels, dict(src.tags())
