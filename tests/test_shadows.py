"""Shadows follow the sun: where a cloud could cast one, in the labels and in the service."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from kappamask.assembly import postprocess
from kappamask.assembly.shadows import (
    CLOUD_HEIGHTS_M,
    Sun,
    cloud_reach,
    sentinel2_sun,
    solar_position,
)
from kappamask.bands import MaskClass
from kappamask.geometry.grid import Grid
from kappamask.sources import open_safe
from kappamask.tools import realdata, teachers
from kappamask.writers.cog import StripWriter

from .conftest import DATA, T29UNU

C = MaskClass


def test_solar_position_matches_the_metadata_of_a_real_product() -> None:
    """T29UNU's MTD_TL.xml gives the mean sun angles over the tile; the formula at the
    sensing time and the tile's centre lands within half a degree of both."""
    product = open_safe(T29UNU)
    assert product.sun is not None and product.footprint
    lon, lat = np.mean(np.array(product.footprint), axis=0)
    sun = solar_position(lat, lon, product.sensing_time)
    assert abs(sun.azimuth - product.sun.azimuth) < 0.5
    assert abs(sun.zenith - product.sun.zenith) < 1.0
    # 10:30 local solar time, Sentinel-2's node: off by the swath's hour, within the spread
    nominal = sentinel2_sun(lat, lon, product.sensing_time)
    assert abs(nominal.azimuth - product.sun.azimuth) < nominal.spread
    # the southern hemisphere's sun stands north: a patch of SEN12MS-CR summer (January)
    south = solar_position(-33.9, 151.2, product.sensing_time.replace(month=1, hour=0))
    assert south.azimuth < 90 or south.azimuth > 270


def _cloud_scene(size: int = 400) -> np.ndarray:
    cloud = np.zeros((size, size), bool)
    cloud[180:220, 180:220] = True
    return cloud


def test_a_cloud_reaches_only_down_sun_within_the_heights() -> None:
    """Sun in the south at 45 degrees, 100 m pixels: a cloud's shadow falls 2 to 120 px
    north of it; south of it and beside it nothing is reachable."""
    cloud = _cloud_scene()
    cast, unsure = cloud_reach(cloud, np.zeros_like(cloud), Sun(180.0, 45.0), 100.0)
    near, far = (h * math.tan(math.radians(45)) / 100 for h in CLOUD_HEIGHTS_M)
    assert cast[180 - 10, 200] and cast[180 - int(far) + 5, 200]  # north, within reach
    assert not cast[230:, :].any()  # south of the cloud: the sun is there
    assert not cast[:, :150].any() and not cast[:, 250:].any()  # beside it
    assert not cast[: 180 - int(far) - 2].any()  # beyond the highest cloud's reach
    assert near < 10
    # unsure: where the up-sun ray leaves the raster (the south edge) before the far reach
    assert unsure[399, 50] and not unsure[0, 50] and not (unsure & cast).any()


def test_an_estimated_sun_looks_across_its_spread_and_an_unknown_one_everywhere() -> None:
    cloud = _cloud_scene()
    narrow, _ = cloud_reach(cloud, np.zeros_like(cloud), Sun(180.0, 45.0), 100.0)
    wide, _ = cloud_reach(cloud, np.zeros_like(cloud), Sun(180.0, 45.0, 25.0), 100.0)
    assert wide.sum() > 1.5 * narrow.sum() and (wide >= narrow).all()
    anywhere, _ = cloud_reach(cloud, np.zeros_like(cloud), None, 100.0)
    assert anywhere[399, 200] and anywhere[200, 0]  # south and west too


def _write(path: Path, classes: np.ndarray, grid: Grid) -> None:
    with StripWriter(path, grid) as out:
        out.write(0, classes)


@pytest.mark.parametrize("strip_rows", [512, 37])
def test_the_service_check_removes_shadow_no_cloud_can_cast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strip_rows: int
) -> None:
    """Sun in the south: the shadow north of the cloud stays; a dark patch south of it (no
    cloud up-sun, the whole ray inside the product) becomes clear; one whose ray leaves the
    product stays (a cloud might lie beyond); the answer does not depend on the strips."""
    classes = np.full((600, 600), C.CLEAR, np.uint8)
    classes[250:300, 250:300] = C.CLOUD
    classes[200:240, 250:300] = C.CLOUD_SHADOW  # north of the cloud: cast by it
    classes[320:360, 250:300] = C.CLOUD_SHADOW  # south: no cloud up-sun
    classes[560:600, 20:60] = C.CLOUD_SHADOW  # the ray leaves through the south edge
    classes[:, :5] = C.MISSING
    grid = Grid("EPSG:32629", Affine(100, 0, 499980, 0, -100, 5900040), 600, 600)
    _write(tmp_path / "model.tif", classes, grid)
    monkeypatch.setattr(postprocess, "STRIP_ROWS", strip_rows)
    for check, expected_shadow in ((False, 2000 + 2000 + 1600), (True, 2000 + 1600)):
        with (
            StripWriter(tmp_path / "mask.tif", grid) as mask_out,
            StripWriter(tmp_path / "valid.tif", grid, nodata=255) as valid_out,
        ):
            counts = postprocess.finish_layers(
                tmp_path / "model.tif",
                grid,
                0,
                0,
                mask_out,
                valid_out,
                None,
                check,
                Sun(180.0, 30.0),
            )
        with rasterio.open(tmp_path / "mask.tif") as src:
            mask = src.read(1)
        assert counts.classes[C.CLOUD_SHADOW] == expected_shadow
        assert (mask[200:240, 250:300] == C.CLOUD_SHADOW).all()
        assert (mask[560:600, 20:60] == C.CLOUD_SHADOW).all()
        assert (mask[320:360, 250:300] == (C.CLEAR if check else C.CLOUD_SHADOW)).all()


def test_labels_teach_dark_ground_without_a_cloud_up_sun_as_clear() -> None:
    """ukis-csmask's shadow: kept where a cloud can cast it, CLEAR where none can (and the
    other teachers say clear), left out where the scene cannot tell."""
    shape = (3, 1)
    valid = np.ones(shape, bool)
    shadow = np.full(shape, teachers.UKIS_SHADOW, np.uint8)
    op = teachers.Opinions(
        valid,
        s2cloudless=np.zeros(shape, np.float32),
        ukis=shadow,
        cirrus=np.zeros(shape, np.float32),
        nir=np.full(shape, 0.1, np.float32),
        cast=np.array([[True], [False], [False]]),
        unsure=np.array([[False], [False], [True]]),
    )
    assert teachers.fuse_l1c(op)[:, 0].tolist() == [C.CLOUD_SHADOW, C.CLEAR, C.UNDEFINED]
    # SCL and ukis-csmask both say shadow; no cloud can cast it: clear
    scl = np.full(shape, C.CLOUD_SHADOW, np.uint8)
    l2a = teachers.Opinions(valid, ukis=shadow, scl=scl, cast=op.cast, unsure=op.unsure)
    assert teachers.fuse_l2a(l2a)[:, 0].tolist() == [C.CLOUD_SHADOW, C.CLEAR, C.UNDEFINED]


def test_real_patches_carry_their_sun_and_cloud_free_targets() -> None:
    """SEN12MS-CR patches: the sun from the place and the season, Sentinel-2's hour; the
    clear target of a pair is published cloud-free, the cloudy one is not."""
    folder = DATA / "sen12mscr"
    cloudy = realdata.read_multiband(folder / "ROIs1970_fall_s2_cloudy_136_p139.tif")
    assert cloudy.sun is not None and not cloudy.cloud_free
    assert 120 < cloudy.sun.azimuth < 200 and 40 < cloudy.sun.zenith < 80  # autumn, north
    assert cloudy.sun.spread > 0


def test_a_published_cloud_free_scene_reads_no_cirrus_into_b10() -> None:
    """Dry winter air lets the surface through the 1375 nm band: B10 above the cirrus
    threshold over a scene the dataset published cloud-free is ground, and its dark pixels
    are not shadow either (no cloud near it)."""
    shape = (2, 1)
    op = teachers.Opinions(
        np.ones(shape, bool),
        s2cloudless=np.zeros(shape, np.float32),
        ukis=np.array([[teachers.UKIS_BACKGROUND], [teachers.UKIS_SHADOW]], np.uint8),
        cirrus=np.full(shape, 0.02, np.float32),
        nir=np.full(shape, 0.1, np.float32),
    )
    assert teachers.fuse_l1c(op)[:, 0].tolist() == [C.SEMI_TRANSPARENT_CLOUD, C.UNDEFINED]
    none = np.zeros(shape, bool)
    free = dataclasses.replace(op, cloud_free=True, cast=none, unsure=none)
    assert teachers.fuse_l1c(free)[:, 0].tolist() == [C.CLEAR, C.CLEAR]


def test_thin_cloud_is_what_ukis_calls_cloud_and_s2cloudless_doubts() -> None:
    """s2cloudless between its clear and cloud thresholds where ukis-csmask sees cloud:
    semi-transparent; above the cloud threshold: cloud; below the clear one: no label."""
    shape = (3, 1)
    op = teachers.Opinions(
        np.ones(shape, bool),
        s2cloudless=np.array([[0.1], [0.35], [0.8]], np.float32),
        ukis=np.full(shape, teachers.UKIS_CLOUD, np.uint8),
        cirrus=np.zeros(shape, np.float32),
    )
    assert teachers.fuse_l1c(op)[:, 0].tolist() == [C.UNDEFINED, C.SEMI_TRANSPARENT_CLOUD, C.CLOUD]
