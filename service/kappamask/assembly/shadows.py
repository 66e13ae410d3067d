"""Where a cloud could cast its shadow: the sun's geometry, used by the service's shadow
check and by the distillation labels.

A cloud at height ``h`` casts its shadow ``h * tan(sun zenith)`` metres away from the
sun, along the sun's azimuth. So a pixel can be in cloud shadow only if some cloud lies
up-sun of it at a distance that a plausible cloud height gives (``CLOUD_HEIGHTS_M``, from
fog-topped stratus to the tropopause). ``cloud_reach`` answers that for every pixel, and
also whether the answer is unknown because the up-sun ray leaves the raster (or crosses
pixels without data) before the largest height's distance: the cloud might lie there.

It works on a raster coarsened until the longest ray is at most ``MAX_RAY_STEPS`` pixels
(a cloud anywhere in a coarse cell counts), so a full 10 m product costs one pass over a
coarse grid of a few million cells, whatever its size. The coarse answer is grown by one
coarse cell, so that coarsening can only keep a shadow, never remove a real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from scipy.ndimage import binary_dilation, distance_transform_edt

#: Heights (metres) of the lowest and highest cloud that may cast a shadow.
CLOUD_HEIGHTS_M = (200.0, 12000.0)
#: Longest ray walked, in (coarse) pixels: bounds the cost on any product.
MAX_RAY_STEPS = 400
#: Sun zenith assumed where a scene's sun geometry is unknown (the reach then looks in
#: every direction, out to the distance of the highest cloud at this zenith).
UNKNOWN_SUN_ZENITH = 65.0
#: Sentinel-2's mean local solar time at the descending node (hours).
SENTINEL2_LOCAL_SOLAR_TIME = 10.5
#: How far an azimuth estimated from 10:30 local solar time may be off: across the 290 km
#: swath the overpass is up to an hour from it (T29UNU's metadata says 172.8 degrees where
#: 10:30 gives 157.2), and a date known only to its season moves it a little more.
ESTIMATED_AZIMUTH_SPREAD = 25.0
#: Angle between the rays walked across an azimuth spread (degrees).
RAY_SPACING = 2.0


@dataclass(frozen=True)
class Sun:
    """The sun as seen from a scene: azimuth clockwise from north, zenith (degrees), and
    how far the azimuth may be off (degrees either side: 0 from metadata, more where it
    is estimated from a date and a place)."""

    azimuth: float
    zenith: float
    spread: float = 0.0


def solar_position(lat: float, lon: float, when: datetime) -> Sun:
    """The sun's azimuth and zenith at ``lat``/``lon`` (degrees) at ``when`` (UTC), by the
    NOAA low-precision formulas (about 0.1 degree): enough for a shadow's direction where
    a scene comes without sun angles in its metadata."""
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    day = when.timetuple().tm_yday
    hours = when.hour + when.minute / 60 + when.second / 3600
    g = 2 * math.pi / 365 * (day - 1 + (hours - 12) / 24)
    eq_time = 229.18 * (
        0.000075
        + 0.001868 * math.cos(g)
        - 0.032077 * math.sin(g)
        - 0.014615 * math.cos(2 * g)
        - 0.040849 * math.sin(2 * g)
    )
    decl = (
        0.006918
        - 0.399912 * math.cos(g)
        + 0.070257 * math.sin(g)
        - 0.006758 * math.cos(2 * g)
        + 0.000907 * math.sin(2 * g)
        - 0.002697 * math.cos(3 * g)
        + 0.00148 * math.sin(3 * g)
    )
    solar_minutes = hours * 60 + eq_time + 4 * lon
    hour_angle = math.radians(solar_minutes / 4 - 180)
    phi = math.radians(lat)
    cos_zen = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(hour_angle)
    zenith = math.acos(max(-1.0, min(1.0, cos_zen)))
    # azimuth clockwise from north, from the east and north components of the sun vector
    east = -math.sin(hour_angle) * math.cos(decl)
    north = math.cos(phi) * math.sin(decl) - math.sin(phi) * math.cos(decl) * math.cos(hour_angle)
    azimuth = math.degrees(math.atan2(east, north)) % 360
    return Sun(azimuth, math.degrees(zenith))


def sentinel2_sun(lat: float, lon: float, day: datetime) -> Sun:
    """The sun over ``lat``/``lon`` when Sentinel-2 passes on ``day`` (10:30 local solar
    time): for scenes that carry a date and a place but no sun angles."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    utc_hours = SENTINEL2_LOCAL_SOLAR_TIME - lon / 15.0
    sun = solar_position(lat, lon, midnight + timedelta(hours=utc_hours))
    return Sun(sun.azimuth, sun.zenith, ESTIMATED_AZIMUTH_SPREAD)


def _shadow_px(sun: Sun | None, resolution: float, height: float) -> float:
    """How far (pixels of ``resolution`` metres) a cloud at ``height`` casts its shadow
    (``UNKNOWN_SUN_ZENITH`` where the sun is unknown)."""
    zenith = sun.zenith if sun is not None else UNKNOWN_SUN_ZENITH
    return height * math.tan(math.radians(min(zenith, 89.0))) / resolution


def _ray_offsets(
    sun: Sun, resolution: float, heights: tuple[float, float]
) -> list[tuple[int, int]]:
    """(row, column) steps from a pixel to where a cloud casting its shadow would lie."""
    near, far = (_shadow_px(sun, resolution, h) for h in heights)
    steps = np.arange(math.floor(near), math.ceil(far) + 1, dtype=np.float64)
    rays = max(1, 2 * math.ceil(sun.spread / RAY_SPACING) + 1)
    pairs: set[tuple[int, int]] = set()
    for azimuth in np.linspace(sun.azimuth - sun.spread, sun.azimuth + sun.spread, rays):
        # image rows grow southwards: north is -row, east is +column
        dy, dx = -math.cos(math.radians(azimuth)), math.sin(math.radians(azimuth))
        pairs.update(
            zip(
                np.rint(steps * dy).astype(int).tolist(),
                np.rint(steps * dx).astype(int).tolist(),
                strict=True,
            )
        )
    return sorted(pairs)


def _walk(mask: np.ndarray, offsets: list[tuple[int, int]], fill: bool) -> np.ndarray:
    """True where ``mask`` holds at any of ``offsets`` from the pixel (``fill`` beyond)."""
    pad = max(max(abs(a), abs(b)) for a, b in offsets)
    padded = np.pad(mask, pad, constant_values=fill)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy, dx in offsets:
        out |= padded[pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return out


def _isotropic(mask: np.ndarray, radius: float, fill: bool) -> np.ndarray:
    """True within ``radius`` pixels of ``mask`` (``fill`` beyond the edge)."""
    pad = math.ceil(radius) + 1
    padded = np.pad(mask, pad, constant_values=fill)
    if not padded.any():
        return np.zeros_like(mask)
    near = distance_transform_edt(~padded) <= radius
    out: np.ndarray = near[pad:-pad, pad:-pad]
    return out


def reach_factor(
    sun: Sun | None, resolution: float, heights: tuple[float, float] = CLOUD_HEIGHTS_M
) -> int:
    """By how much ``cloud_reach`` coarsens a raster of ``resolution`` metres."""
    return max(1, math.ceil(_shadow_px(sun, resolution, heights[1]) / MAX_RAY_STEPS))


def coarsen(mask: np.ndarray, k: int, fill: bool) -> np.ndarray:
    """Any-pooling by ``k`` (the ragged edge padded with ``fill``): a coarse cell holds
    cloud (or unknown ground) where any of its pixels does."""
    if k == 1:
        return mask
    h, w = mask.shape
    ph, pw = -h % k, -w % k
    padded = np.pad(mask, ((0, ph), (0, pw)), constant_values=fill)
    pooled: np.ndarray = padded.reshape((h + ph) // k, k, (w + pw) // k, k).any(axis=(1, 3))
    return pooled


def coarse_reach(
    cloud: np.ndarray,
    unknown: np.ndarray,
    sun: Sun | None,
    resolution: float,
    k: int,
    heights: tuple[float, float] = CLOUD_HEIGHTS_M,
) -> tuple[np.ndarray, np.ndarray]:
    """``cloud_reach`` on masks already coarsened by ``k`` (``coarsen``), answered on the
    coarse grid, each cell grown by one where ``k`` > 1 (coarsening may only keep a
    shadow, never remove one)."""
    coarse_res = resolution * k
    if sun is None:
        radius = _shadow_px(None, coarse_res, heights[1])
        cast, unsure = _isotropic(cloud, radius, False), _isotropic(unknown, radius, True)
    else:
        offsets = _ray_offsets(sun, coarse_res, heights)
        cast, unsure = _walk(cloud, offsets, False), _walk(unknown, offsets, True)
    if k > 1:
        grow = np.ones((3, 3), bool)
        cast, unsure = binary_dilation(cast, grow), binary_dilation(unsure, grow)
    return cast, unsure & ~cast


def cloud_reach(
    cloud: np.ndarray,
    unknown: np.ndarray,
    sun: Sun | None,
    resolution: float,
    heights: tuple[float, float] = CLOUD_HEIGHTS_M,
) -> tuple[np.ndarray, np.ndarray]:
    """(cast, unsure): where a pixel of ``cloud`` lies up-sun within the heights' reach (a
    shadow is possible), and where the up-sun ray crosses ``unknown`` pixels or leaves the
    raster instead (a cloud might lie there). ``sun`` None looks in every direction."""
    k = reach_factor(sun, resolution, heights)
    cast, unsure = coarse_reach(
        coarsen(cloud, k, False), coarsen(unknown, k, True), sun, resolution, k, heights
    )
    h, w = cloud.shape
    return upsample(cast, k, h, w), upsample(unsure, k, h, w)


def upsample(coarse: np.ndarray, k: int, height: int, width: int) -> np.ndarray:
    """A coarse mask back on the full grid (each cell repeated ``k`` x ``k``)."""
    if k == 1:
        return coarse
    out: np.ndarray = np.repeat(np.repeat(coarse, k, 0), k, 1)[:height, :width]
    return out
