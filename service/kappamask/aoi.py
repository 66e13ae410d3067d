"""Areas of interest: a lon/lat ``bbox`` or a GeoJSON ``aoi`` limits the output grid (so
crops outside it are never computed); pixels of the grid outside a polygon are missing."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely.errors import GEOSException
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from kappamask.errors import InvalidInputError, ProductError
from kappamask.reader import Grid

_POLYGONAL = {"Polygon", "MultiPolygon"}


def parse_area(bbox: Sequence[float] | None, aoi: Mapping[str, Any] | None) -> BaseGeometry | None:
    """The area in EPSG:4326 from a ``[west, south, east, north]`` bbox or GeoJSON geometry
    (a Feature's geometry is taken)."""
    if bbox is not None and aoi is not None:
        raise InvalidInputError("give either 'bbox' or 'aoi', not both")
    if bbox is not None:
        if (
            not isinstance(bbox, Sequence)
            or isinstance(bbox, str)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        ):
            raise InvalidInputError("'bbox' must be [west, south, east, north] in degrees")
        west, south, east, north = (float(v) for v in bbox)
        if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
            raise InvalidInputError(
                "'bbox' must be [west, south, east, north] in degrees, west < east, south < north"
            )
        return box(west, south, east, north)
    if aoi is None:
        return None
    if not isinstance(aoi, Mapping):
        raise InvalidInputError("'aoi' must be a GeoJSON Polygon or MultiPolygon")
    geometry = aoi.get("geometry") if aoi.get("type") == "Feature" else aoi
    if not isinstance(geometry, Mapping) or geometry.get("type") not in _POLYGONAL:
        raise InvalidInputError("'aoi' must be a GeoJSON Polygon or MultiPolygon")
    try:
        area = shape(geometry)
    except (GEOSException, ValueError, TypeError, KeyError, IndexError) as err:
        raise InvalidInputError(f"'aoi' is not a valid GeoJSON geometry: {err}") from err
    if area.is_empty or not area.is_valid:
        raise InvalidInputError("'aoi' is empty or not a valid polygon (self-intersecting?)")
    return area


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
