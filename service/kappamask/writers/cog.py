"""Cloud-Optimized GeoTIFFs of the result's rasters (class map, confidence, cloud
probability, usable-pixel mask).

The pipeline streams finished strips into a plain GeoTIFF (``StripWriter``, ZSTD at its
fastest level: written once, read once); at the end ``to_cog`` rewrites it as a COG with
GDAL's COG driver: uint8, 512 px blocks, DEFLATE (what every COG reader decodes), the
raster's nodata, the class colour table where there is one, and overviews by the raster's
own rule ('mode' for the class map: a categorical raster must never be averaged; 'average'
for the probability). The driver compresses blocks on all cores; rio-cogeo's translate,
used before, built the overviews in a temporary file on one (2.5x slower on a 10980 px
class map).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.shutil import copy
from rasterio.windows import Window

from kappamask.bands import CLASS_COLORS
from kappamask.gdal import COG_ENV
from kappamask.grid import Grid

LOGGER = logging.getLogger(__name__)

OverviewResampling = Literal["mode", "average", "nearest"]

#: COG creation options of every raster the service writes (GDAL's COG driver).
COG_OPTIONS = {
    "COMPRESS": "DEFLATE",
    "BLOCKSIZE": 512,
    "NUM_THREADS": "ALL_CPUS",
    "BIGTIFF": "IF_SAFER",
}
#: Scratch GeoTIFF compression: fast, and a tenth of the uncompressed size on disk.
SCRATCH_OPTIONS = {"compress": "ZSTD", "zstd_level": 1}


class StripWriter:
    """A scratch single-band uint8 GeoTIFF on ``grid`` that takes rows as they finish."""

    def __init__(self, path: Path, grid: Grid, colormap: bool = False, nodata: int = 0) -> None:
        self.path = path
        self.grid = grid
        self.colormap = colormap
        self.nodata = nodata
        self._dst: rasterio.io.DatasetWriter | None = None

    def __enter__(self) -> StripWriter:
        self._dst = rasterio.open(
            self.path, "w", driver="GTiff", width=self.grid.width, height=self.grid.height,
            count=1, dtype="uint8", crs=self.grid.crs, transform=self.grid.transform,
            nodata=self.nodata, tiled=True, blockxsize=512, blockysize=512, **SCRATCH_OPTIONS,
        )  # fmt: skip
        if self.colormap:
            # On the scratch file already, so the COG's overviews are built on a palette band.
            self._dst.write_colormap(1, dict(CLASS_COLORS))
        return self

    def write(self, row_start: int, rows: np.ndarray) -> None:
        """Write ``rows`` [h, width] starting at grid row ``row_start``."""
        assert self._dst is not None
        self._dst.write(rows, 1, window=Window(0, row_start, rows.shape[1], rows.shape[0]))

    def __exit__(self, *exc_info: object) -> None:
        if self._dst is not None:
            self._dst.close()


def to_cog(
    src: Path,
    dst: Path,
    tags: dict[str, str] | None = None,
    overviews: OverviewResampling = "mode",
) -> None:
    """Rewrite the scratch GeoTIFF ``src`` as a COG at ``dst`` (its nodata and colour table
    kept), with overviews resampled by ``overviews``."""
    with rasterio.Env(**COG_ENV):
        if tags:
            with rasterio.open(src, "r+") as ds:
                ds.update_tags(**tags)
        copy(src, dst, driver="COG", OVERVIEW_RESAMPLING=overviews.upper(), **COG_OPTIONS)
    LOGGER.debug("wrote %s", dst)
