"""The output grid: where the mask's pixels are (``Grid``), the grid of a product at a
resolution (``output_grid``), its part over a user's area (``clip_grid``) and which of its
pixels the area covers (``area_mask``). The reader resamples onto it, the writers
georeference with it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from kappamask.errors import ProductError
from kappamask.reading.gdal import GDAL_ENV, open_band, product_errors
from kappamask.sources.product import Product


@dataclass(frozen=True)
class Grid:
    """The output raster grid: CRS, affine transform and size in pixels."""

    crs: str
    transform: Affine
    width: int
    height: int

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    @property
    def warp(self) -> dict[str, Any]:
        """This grid as the target of a ``WarpedVRT`` (or ``rasterio.warp.reproject``)."""
        return {
            "crs": self.crs,
            "transform": self.transform,
            "width": self.width,
            "height": self.height,
        }

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return (
            left,
            top + self.height * self.transform.e,
            left + self.width * self.transform.a,
            top,
        )


def output_grid(product: Product, resolution: int) -> Grid:
    """The grid at ``resolution`` metres (one of RESOLUTIONS, as RunOptions checks)
    covering the product's band files."""
    band = next((b for b in ("B02", "B04", "B8A", "B01") if product.has_band(b)), None)
    if band is None:
        raise ProductError(f"{product.product_id} has no spectral band files")
    path, _res = product.band_path(band, resolution)
    with (
        product_errors(f"open {band} of {product.product_id}"),
        product.rasterio_env(**GDAL_ENV),
        open_band(path) as src,
    ):
        left, bottom, right, top = src.bounds
        crs = src.crs.to_string() if src.crs else product.crs
    width = math.ceil(round((right - left) / resolution, 6))
    height = math.ceil(round((top - bottom) / resolution, 6))
    return Grid(crs, Affine(resolution, 0.0, left, 0.0, -resolution, top), width, height)


def clip_grid(grid: Grid, area: BaseGeometry) -> tuple[Grid, dict[str, Any]]:
    """The part of ``grid`` covering ``area`` (snapped outwards to whole pixels), and the
    area in the grid's CRS. ProductError when the area misses the product."""
    local = transform_geom("EPSG:4326", grid.crs, mapping(area))
    minx, miny, maxx, maxy = shape(local).bounds
    res = grid.resolution
    left, top = grid.transform.c, grid.transform.f
    col0 = max(0, math.floor((minx - left) / res))
    col1 = min(grid.width, math.ceil((maxx - left) / res))
    row0 = max(0, math.floor((top - maxy) / res))
    row1 = min(grid.height, math.ceil((top - miny) / res))
    if col1 <= col0 or row1 <= row0:
        raise ProductError("the bbox/aoi lies outside the product")
    transform = Affine(res, 0.0, left + col0 * res, 0.0, -res, top - row0 * res)
    return Grid(grid.crs, transform, col1 - col0, row1 - row0), dict(local)


def area_mask(grid: Grid, local_area: Mapping[str, Any], window: Window) -> np.ndarray:
    """True where a pixel of ``window`` of ``grid`` touches the area (in the grid's CRS)."""
    h, w = int(window.height), int(window.width)
    transform = grid.transform @ Affine.translation(window.col_off, window.row_off)
    mask: np.ndarray = geometry_mask(
        [local_area], out_shape=(h, w), transform=transform, invert=True, all_touched=True
    )
    return mask
