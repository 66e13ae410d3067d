"""The PNG preview of a result: the (buffered) mask over a true-colour quicklook of the
product, at most ``max_size`` pixels a side.

Clear pixels show the image as it is; shadow, semi-transparent cloud and cloud are tinted
in their overlay colour with the class edges drawn opaque, so the mask can be judged
against the clouds it outlines. Without readable B04/B03/B02 the classes are drawn in their
flat colours alone.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from kappamask.bands import CLASS_COLORS, MaskClass
from kappamask.reading.gdal import GDAL_ENV, open_band
from kappamask.sources.product import Product

LOGGER = logging.getLogger(__name__)

PREVIEW_MAX_SIZE = 1024
#: Reflectance x gain = display brightness (2.5, as the usual Sentinel-2 true colour).
TRUE_COLOUR_GAIN = 2.5
#: Overlay tint per class (clear: none) and how much of it covers the image.
OVERLAY = {
    MaskClass.CLOUD_SHADOW: (150, 60, 200),
    MaskClass.SEMI_TRANSPARENT_CLOUD: (70, 190, 255),
    MaskClass.CLOUD: (255, 200, 0),
}
OVERLAY_ALPHA = 0.45


def _shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    scale = max(max(width, height) / max_size, 1)
    return max(1, round(height / scale)), max(1, round(width / scale))


def true_colour(
    product: Product, bounds: tuple[float, float, float, float], shape: tuple[int, int]
) -> np.ndarray | None:
    """RGB uint8 [3, h, w] of the product over ``bounds`` (its CRS), 0 where a band has no
    data; None where the bands cannot be read (the preview then shows flat colours)."""
    bands = ("B04", "B03", "B02")
    if not all(product.has_band(b) for b in bands):
        return None
    rgb = np.zeros((3, *shape), dtype=np.uint8)
    nodata = np.zeros(shape, dtype=bool)
    try:
        with product.rasterio_env(**GDAL_ENV):
            for i, band in enumerate(bands):
                # the coarsest file: a decimated read of a JPEG 2000 decodes a reduced level
                path, _res = product.band_path(band, 60)
                with open_band(path) as src:
                    dn = src.read(
                        1,
                        window=src.window(*bounds),
                        out_shape=shape,
                        resampling=Resampling.average,
                    ).astype(np.float32)
                nodata |= dn == 0
                dn *= product.gains.get(band, 1.0)
                reflectance = (dn + product.offsets.get(band, 0.0)) / product.quantification
                rgb[i] = np.clip(reflectance * TRUE_COLOUR_GAIN * 255, 0, 255).astype(np.uint8)
    except (RasterioIOError, OSError, ValueError) as err:
        LOGGER.warning("preview without the true-colour image: %s", err)
        return None
    rgb[:, nodata] = 0
    return rgb


def _edges(classes: np.ndarray) -> np.ndarray:
    """True on pixels whose class differs from a 4-neighbour's."""
    edge = np.zeros(classes.shape, dtype=bool)
    vertical = classes[1:] != classes[:-1]
    horizontal = classes[:, 1:] != classes[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def render(classes: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
    """RGBA uint8 [4, h, w]: the classes over ``rgb`` (or in flat colours)."""
    if rgb is None:
        lut = np.zeros((256, 4), dtype=np.uint8)
        for code, rgba in CLASS_COLORS.items():
            lut[code] = rgba
        return np.moveaxis(lut[classes], -1, 0)
    image = rgb.astype(np.float32)
    edges = _edges(classes)
    for cls, colour in OVERLAY.items():
        where = classes == cls
        tint = np.array(colour, np.float32)[:, None]
        image[:, where] = (1 - OVERLAY_ALPHA) * image[:, where] + OVERLAY_ALPHA * tint
        image[:, where & edges] = tint
    alpha = np.where(classes == MaskClass.MISSING, 0, 255).astype(np.uint8)
    return np.concatenate([np.clip(image, 0, 255).astype(np.uint8), alpha[None]])


def write_preview(
    mask_path: Path, dst: Path, product: Product | None = None, max_size: int = PREVIEW_MAX_SIZE
) -> None:
    """Render the mask COG at ``mask_path`` (read from its overviews) over the true colours
    of ``product`` to an RGBA PNG."""
    with rasterio.open(mask_path) as src:
        shape = _shape(src.width, src.height, max_size)
        classes = src.read(1, out_shape=shape, resampling=Resampling.mode)
        left, bottom, right, top = src.bounds
    rgb = None if product is None else true_colour(product, (left, bottom, right, top), shape)
    write_png(render(classes, rgb), dst)


def write_png(image: np.ndarray, dst: Path) -> None:
    """An RGB(A) uint8 [bands, h, w] image as a PNG. A picture, not a map: no
    georeferencing (which would need a sidecar file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            dst,
            "w",
            driver="PNG",
            width=image.shape[2],
            height=image.shape[1],
            count=image.shape[0],
            dtype="uint8",
        ) as out:
            out.write(image)
