"""The PNG preview of a mask: the class colours, at most ``max_size`` pixels a side."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning

from kappamask.bands import CLASS_COLORS

PREVIEW_MAX_SIZE = 1024


def write_preview(mask_path: Path, dst: Path, max_size: int = PREVIEW_MAX_SIZE) -> None:
    """Render the mask COG at ``mask_path`` to an RGBA PNG (read from its overviews)."""
    with rasterio.open(mask_path) as src:
        scale = max(src.width, src.height) / max_size
        shape = (
            max(1, round(src.height / max(scale, 1))),
            max(1, round(src.width / max(scale, 1))),
        )
        classes = src.read(1, out_shape=shape, resampling=Resampling.mode)
    lut = np.zeros((256, 4), dtype=np.uint8)
    for code, rgba in CLASS_COLORS.items():
        lut[code] = rgba
    image = np.moveaxis(lut[classes], -1, 0)
    # A preview is a picture, not a map: no georeferencing (which would need a sidecar file).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            dst, "w", driver="PNG", width=shape[1], height=shape[0], count=4, dtype="uint8"
        ) as out:
            out.write(image)
