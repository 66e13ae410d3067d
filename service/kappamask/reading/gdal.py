"""The GDAL settings of every raster read, and what a failed read of a product's file
means: one place, so that the pipeline's reader, the grid, the preview, the training data
and the evaluation read files the same way."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rasterio.env import Env
from rasterio.errors import RasterioIOError
from rasterio.io import DatasetReader

from kappamask.errors import AccessDeniedError, ProductError, ProductNotFoundError, StorageError
from kappamask.reading import egress

#: GDAL settings of every read: threads for JPEG 2000 decoding, a block cache for the
#: warped reads (aligned bands keep their own decoded rows, see BlockRows), and no
#: directory listing on remote files.
GDAL_ENV = {
    "GDAL_NUM_THREADS": "ALL_CPUS",
    "GDAL_CACHEMAX": 192,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}

#: GDAL settings of the COG writes: a small block cache. GDAL's default (5 % of the RAM)
#: let two COGs built side by side of a 10980 px product hold 0.75 GB of blocks they never
#: read again (measured: peak 0.99 GB with the default, 0.29 GB with 64 MB, no slower).
COG_ENV = {"GDAL_CACHEMAX": 64}


#: The only formats a band file may be (ESA's JPEG 2000, the COGs of STAC catalogues):
#: GDAL picks a driver by content, not by name, and a "B04.jp2" that is a VRT (or any
#: format that names other files) would make GDAL read files or URLs the access policy
#: never saw.
BAND_DRIVERS = ("JP2OpenJPEG", "GTiff")


def open_band(path: str) -> DatasetReader:
    """A product's band file, opened only as JPEG 2000 or GeoTIFF (``BAND_DRIVERS``;
    ``rasterio.open`` takes one driver, its reader a list, and needs GDAL's drivers
    registered, which an environment does)."""
    with Env():
        return DatasetReader(path, driver=list(BAND_DRIVERS))


#: What GDAL says when a remote file's server or the network failed (curl's words, or an
#: HTTP status of the server's own trouble): the storage's fault, not the product's.
_UNREACHABLE = re.compile(
    r"HTTP response code: (0|5\d\d)\b|Could not resolve|Couldn't connect|Connection refused|"
    r"timed out|Timeout was reached|Empty reply|Recv failure|SSL|CURL error|Failed to connect|"
    r"Could not connect",
    re.IGNORECASE,
)
_HTTP_STATUS = re.compile(r"HTTP response code: (\d{3})")


@contextmanager
def product_errors(what: str) -> Iterator[None]:
    """A RasterioIOError inside becomes the project's error: a band file that is missing,
    truncated or not a raster is the product's fault (422); a remote file's host that the
    policy refused (a redirect elsewhere: kappamask.reading.egress) 403, one that answers 403/404
    403/404; an unreachable or failing storage 502."""
    started = time.monotonic()
    try:
        yield
    except RasterioIOError as err:
        text = str(err)
        refused = egress.refusals_since(started)
        if refused:
            raise AccessDeniedError(
                f"cannot {what}: its URL led to host {refused[-1].host}, which this server "
                f"may not contact ({refused[-1].reason})"
            ) from err
        status = _HTTP_STATUS.search(text)
        if status and status.group(1) in {"401", "403"}:
            raise AccessDeniedError(f"cannot {what}: access denied by the storage") from err
        if status and status.group(1) == "404":
            raise ProductNotFoundError(f"cannot {what}: the storage has no such file") from err
        if _UNREACHABLE.search(text):
            raise StorageError(
                f"cannot {what}: the storage failed or cannot be reached ({text[:200]})"
            ) from err
        raise ProductError(f"cannot {what}: {err}") from err
