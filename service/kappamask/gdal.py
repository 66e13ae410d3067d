"""The GDAL settings of every raster read, and what a failed read of a product's file
means: one place, so that the pipeline's reader, the grid, the preview, the training data
and the evaluation read files the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rasterio.errors import RasterioIOError

from kappamask.errors import ProductError

#: GDAL settings of every read: threads for JPEG 2000 decoding, a block cache for the
#: warped reads (aligned bands keep their own decoded rows, see BlockRows), and no
#: directory listing on remote files.
GDAL_ENV = {
    "GDAL_NUM_THREADS": "ALL_CPUS",
    "GDAL_CACHEMAX": 192,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}


@contextmanager
def product_errors(what: str) -> Iterator[None]:
    """A RasterioIOError inside becomes ProductError("cannot {what}: ..."): a band file that
    is missing, truncated or not a raster is the product's fault (422), not the server's."""
    try:
        yield
    except RasterioIOError as err:
        raise ProductError(f"cannot {what}: {err}") from err
