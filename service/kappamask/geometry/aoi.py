"""Areas of interest: a lon/lat ``bbox`` or a GeoJSON ``aoi`` limits the output grid (so
crops outside it are never computed); pixels of the grid outside a polygon are missing."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shapely.errors import GEOSException
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from kappamask.errors import InvalidInputError

_POLYGONAL = {"Polygon", "MultiPolygon"}


def parse_area(bbox: Sequence[float] | None, aoi: Mapping[str, Any] | None) -> BaseGeometry | None:
    """The area in EPSG:4326 from a ``[west, south, east, north]`` bbox or GeoJSON: a
    (Multi)Polygon, a Feature of one, or a FeatureCollection of them (their union)."""
    if bbox is not None and aoi is not None:
        raise InvalidInputError("give either 'bbox' or 'aoi', not both")
    if bbox is not None:
        if (
            not isinstance(bbox, Sequence)
            or isinstance(bbox, str)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        ):
            raise InvalidInputError("input 'bbox' must be [west, south, east, north] in degrees")
        try:
            west, south, east, north = (float(v) for v in bbox)
        except OverflowError:  # an integer past any float: not degrees either
            west = south = east = north = math.nan
        if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
            raise InvalidInputError(
                "input 'bbox' must be [west, south, east, north] in degrees, west < east, "
                "south < north"
            )
        return box(west, south, east, north)
    if aoi is None:
        return None
    if not isinstance(aoi, Mapping):
        raise InvalidInputError("input 'aoi' must be a GeoJSON Polygon or MultiPolygon")
    if aoi.get("type") == "FeatureCollection":
        features = aoi.get("features")
        if not isinstance(features, list) or not features:
            raise InvalidInputError("input 'aoi' is a FeatureCollection without features")
        area = unary_union([_polygon(f) for f in features])
    else:
        area = _polygon(aoi)
    if area.is_empty or not area.is_valid:
        raise InvalidInputError("input 'aoi' is empty or not a valid polygon (self-intersecting?)")
    west, south, east, north = area.bounds
    if not (-180 <= west <= east <= 180 and -90 <= south <= north <= 90):
        raise InvalidInputError(
            "input 'aoi' must lie within longitudes -180..180 and "
            "latitudes -90..90 (EPSG:4326 degrees)"
        )
    return area


def _polygon(aoi: Any) -> BaseGeometry:
    """The (Multi)Polygon of a GeoJSON geometry or Feature."""
    geometry = (
        aoi.get("geometry") if isinstance(aoi, Mapping) and aoi.get("type") == "Feature" else aoi
    )
    if not isinstance(geometry, Mapping) or geometry.get("type") not in _POLYGONAL:
        raise InvalidInputError("input 'aoi' must be a GeoJSON Polygon or MultiPolygon")
    try:
        return shape(geometry)
    except (
        GEOSException,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        AttributeError,
    ) as err:
        raise InvalidInputError(f"input 'aoi' is not a valid GeoJSON geometry: {err}") from err
