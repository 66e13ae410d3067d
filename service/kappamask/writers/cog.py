"""Cloud-Optimized GeoTIFFs of the result's rasters (class map, confidence, cloud
probability, usable-pixel mask).

The pipeline streams finished strips into a plain GeoTIFF (``StripWriter``); at the end
``to_cog`` rewrites it as a COG: uint8, 512 px blocks, DEFLATE, the raster's nodata, the
class colour table where there is one, and overviews by the raster's own rule ('mode' for
the class map: a categorical raster must never be averaged; 'average' for the probability).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from kappamask.bands import CLASS_COLORS
from kappamask.gdal import COG_ENV
from kappamask.grid import Grid

LOGGER = logging.getLogger(__name__)

OverviewResampling = Literal["mode", "average", "nearest"]

#: COG creation profile of every raster the service writes.
COG_PROFILE = {
    **cog_profiles.get("deflate"),  # type: ignore[no-untyped-call]
    "blockxsize": 512,
    "blockysize": 512,
}


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
            nodata=self.nodata, tiled=True, blockxsize=512, blockysize=512, compress="LZW",
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
    with rasterio.Env(**COG_ENV), rasterio.open(src) as ds:
        cog_translate(
            ds, dst, dict(COG_PROFILE), nodata=ds.nodata, overview_resampling=overviews,
            additional_cog_metadata=tags, in_memory=False, quiet=True,
        )  # fmt: skip
    LOGGER.debug("wrote %s", dst)
