"""Reference labels on the output grid: Sen2Cor SCL mapped to mask codes (paper, Table 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from kappamask.bands import SCL_TO_CLASS, MaskClass
from kappamask.errors import ProductError
from kappamask.geometry.grid import Grid
from kappamask.reading.gdal import GDAL_ENV
from kappamask.sources.product import Product


def scl_to_mask(scl: np.ndarray) -> np.ndarray:
    """Map SCL codes to mask codes; codes SCL does not define become UNDEFINED."""
    lut = np.full(256, MaskClass.UNDEFINED, dtype=np.uint8)
    for code, cls in SCL_TO_CLASS.items():
        lut[code] = cls
    return lut[scl.astype(np.uint8)]


#: Sen2Cor's SCL code for water.
SCL_WATER = 6


def read_scl_labels(product: Product, grid: Grid) -> np.ndarray:
    """The product's SCL layer on ``grid`` (nearest neighbour), as mask codes."""
    return scl_to_mask(read_scl(product, grid))


def read_scl(product: Product, grid: Grid) -> np.ndarray:
    """The product's SCL layer on ``grid`` (nearest neighbour), Sen2Cor's own codes."""
    if not product.has_band("SCL"):
        raise ProductError(f"{product.product_id} has no SCL layer (an L2A product is needed)")
    path, _res = product.band_path("SCL", int(grid.resolution))
    return read_nearest(path, grid)


def read_nearest(path: str | Path, grid: Grid, nodata: float | None = None) -> np.ndarray:
    """The first band of a raster of classes on ``grid`` (nearest neighbour; ``nodata``
    where the raster does not reach)."""
    with (
        rasterio.Env(**GDAL_ENV),
        rasterio.open(path) as src,
        WarpedVRT(src, **grid.warp, resampling=Resampling.nearest, nodata=nodata) as vrt,
    ):
        codes: np.ndarray = vrt.read(1)
        return codes
