"""After the model: the shadow check, cloud and shadow buffers, the usable-pixel mask and
the class counts.

The shadow check (on by default; ``RunOptions.shadow_check``) turns CLOUD_SHADOW that no
cloud of the product could cast into CLEAR: a cloud at 200 m to 12 km casts its shadow
along the sun's azimuth, ``height * tan(sun zenith)`` away (kappamask.assembly.shadows), so dark
forest, water or soil with no cloud anywhere up-sun is ground, not shadow. Where the
up-sun ray leaves the product or crosses pixels without data, a cloud might lie there and
the shadow stays. It is computed once for the whole product on a coarse grid (a first
pass over the class raster), so it is the same across strips and crops.

The mosaic of the model's classes is written first; this pass reads it back in strips
with a halo as deep as the largest buffer, so a buffer crosses strip and crop edges as if
the whole raster were processed at once (no seams), while memory stays that of a strip.

A buffer of ``r`` pixels is a dilation by a disc: a pixel joins it when its centre lies
within ``r`` pixel widths of a pixel of the class (Euclidean distance transform, exact for
any radius and far cheaper than a dilation with a 201 x 201 structuring element).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window
from scipy.ndimage import distance_transform_edt

from kappamask.assembly.shadows import Sun, coarse_reach, coarsen, reach_factor, upsample
from kappamask.bands import VALID_CLEAR, VALID_NODATA, VALID_UNUSABLE, MaskClass
from kappamask.geometry.grid import Grid, area_mask
from kappamask.writers.cog import StripWriter

#: Rows of the class raster handled at once (plus the halo above and below).
STRIP_ROWS = 512


def _near(mask: np.ndarray, radius: float) -> np.ndarray:
    """True where a pixel's centre lies within ``radius`` pixels of a True pixel."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    # distance of each pixel to the nearest True one (0 on them); float64 sqrt of an
    # integer sum, so compare with a tolerance instead of an exact radius
    distance = distance_transform_edt(~mask)
    return np.asarray(distance <= radius + 1e-9)


def apply_buffers(classes: np.ndarray, cloud_px: float, shadow_px: float) -> np.ndarray:
    """The class map with clouds grown by ``cloud_px`` and shadows by ``shadow_px`` pixels.

    The cloud buffer grows opaque and semi-transparent cloud over clear and shadow pixels
    (a pixel near opaque cloud becomes cloud, one near semi-transparent cloud only becomes
    semi-transparent cloud); the shadow buffer then grows shadow over clear pixels only.
    MISSING is never overwritten, and no class shrinks.
    """
    out = classes.copy()
    free = (classes == MaskClass.CLEAR) | (classes == MaskClass.CLOUD_SHADOW)
    if cloud_px > 0:
        near_cloud = _near(classes == MaskClass.CLOUD, cloud_px) & free
        near_semi = _near(classes == MaskClass.SEMI_TRANSPARENT_CLOUD, cloud_px) & free
        out[near_semi & ~near_cloud] = MaskClass.SEMI_TRANSPARENT_CLOUD
        out[near_cloud] = MaskClass.CLOUD
    if shadow_px > 0:
        near_shadow = _near(classes == MaskClass.CLOUD_SHADOW, shadow_px)
        out[near_shadow & (out == MaskClass.CLEAR)] = MaskClass.CLOUD_SHADOW
    return out


def valid_layer(classes: np.ndarray) -> np.ndarray:
    """The usable-pixel mask of a (buffered) class map: 1 clear, 0 other, 255 no data."""
    valid = np.full(classes.shape, VALID_UNUSABLE, dtype=np.uint8)
    valid[classes == MaskClass.CLEAR] = VALID_CLEAR
    valid[classes == MaskClass.MISSING] = VALID_NODATA
    return valid


@dataclass
class LayerCounts:
    """Pixels per class code of the final class map, and pixels of the user's area."""

    classes: np.ndarray
    #: Pixels inside the bbox/aoi (with or without data); None without one: the raster.
    area_pixels: int | None


class ShadowCheck:
    """Where the product's clouds could cast a shadow (or a cloud might lie unseen), on
    the coarse grid of ``shadows.cloud_reach``: built in one pass over the class raster."""

    def __init__(self, src: rasterio.io.DatasetReader, grid: Grid, sun: Sun | None):
        self.k = k = reach_factor(sun, grid.resolution)
        rows = k * math.ceil(STRIP_ROWS / k)
        clouds, unknown = [], []
        for top in range(0, grid.height, rows):
            block = src.read(1, window=Window(0, top, grid.width, min(rows, grid.height - top)))
            cloudy = (block == MaskClass.CLOUD) | (block == MaskClass.SEMI_TRANSPARENT_CLOUD)
            clouds.append(coarsen(cloudy, k, False))
            unknown.append(coarsen(block == MaskClass.MISSING, k, True))
        cast, unsure = coarse_reach(
            np.concatenate(clouds), np.concatenate(unknown), sun, grid.resolution, k
        )
        self.possible = cast | unsure

    def apply(self, block: np.ndarray, top: int) -> np.ndarray:
        """``block`` (full-width rows from ``top``) with impossible shadow made CLEAR."""
        shadow = block == MaskClass.CLOUD_SHADOW
        if not shadow.any():
            return block
        k = self.k
        first, last = top // k, (top + block.shape[0] - 1) // k + 1
        possible = upsample(
            self.possible[first:last], k, (last - first) * k, self.possible.shape[1] * k
        )
        possible = possible[top - first * k : top - first * k + block.shape[0], : block.shape[1]]
        out = block.copy()
        out[shadow & ~possible] = MaskClass.CLEAR
        return out


def finish_layers(
    model_classes: Path,
    grid: Grid,
    cloud_px: float,
    shadow_px: float,
    classes_out: StripWriter,
    valid_out: StripWriter,
    local_area: Mapping[str, Any] | None = None,
    shadow_check: bool = False,
    sun: Sun | None = None,
) -> LayerCounts:
    """Check the shadows of the model's class raster against the sun (``shadow_check``;
    ``sun`` None: in every direction), buffer it into ``classes_out``, write the
    usable-pixel mask to ``valid_out`` and count the classes (and the area's pixels)."""
    halo = math.ceil(max(cloud_px, shadow_px, 0.0)) + 1 if max(cloud_px, shadow_px) > 0 else 0
    counts = np.zeros(256, dtype=np.int64)
    area_pixels = 0 if local_area is not None else None
    with rasterio.open(model_classes) as src:
        check = ShadowCheck(src, grid, sun) if shadow_check else None
        for top in range(0, grid.height, STRIP_ROWS):
            bottom = min(grid.height, top + STRIP_ROWS)
            read_top, read_bottom = max(0, top - halo), min(grid.height, bottom + halo)
            block = src.read(1, window=Window(0, read_top, grid.width, read_bottom - read_top))
            if check is not None:
                block = check.apply(block, read_top)
            buffered = apply_buffers(block, cloud_px, shadow_px)
            rows = buffered[top - read_top : bottom - read_top]
            classes_out.write(top, rows)
            valid_out.write(top, valid_layer(rows))
            counts += np.bincount(rows.ravel(), minlength=256)
            if area_pixels is not None and local_area is not None:
                window = Window(0, top, grid.width, bottom - top)
                area_pixels += int(area_mask(grid, local_area, window).sum())
    return LayerCounts(counts, area_pixels)
