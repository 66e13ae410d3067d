"""The GDAL settings of every raster read: one place, so that the pipeline's reader, the
preview, the training data and the evaluation read files the same way."""

from __future__ import annotations

#: GDAL settings of every read: threads for JPEG 2000 decoding, a block cache for the
#: warped reads (aligned bands keep their own decoded rows, see BlockRows), and no
#: directory listing on remote files.
GDAL_ENV = {
    "GDAL_NUM_THREADS": "ALL_CPUS",
    "GDAL_CACHEMAX": 192,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}
