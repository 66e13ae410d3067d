"""The output grid, without a server: the product's grid at each resolution, the part of
it over a user's area (snapped outwards to whole pixels) and which pixels the area covers,
window by window as the pipeline asks."""

from __future__ import annotations

import pytest
import rasterio
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely.geometry import box, mapping, shape

from kappamask.errors import ProductError
from kappamask.geometry.grid import area_mask, clip_grid, output_grid
from kappamask.sources import open_safe

from .conftest import T29UNU


@pytest.mark.parametrize("resolution", [10, 20, 60])
def test_the_grid_is_the_tiles_at_each_resolution(resolution: int) -> None:
    grid = output_grid(open_safe(T29UNU), resolution)
    b04 = next(T29UNU.glob("GRANULE/*/IMG_DATA/R60m/*_B04_60m.jp2"))
    with rasterio.open(b04) as src:  # the 60 m file covers the tile (a cut of it here)
        assert grid.bounds == pytest.approx(tuple(src.bounds))
        assert grid.crs == src.crs.to_string()
        assert (grid.width, grid.height) == (
            src.width * 60 // resolution,
            src.height * 60 // resolution,
        )
    assert grid.resolution == resolution


def test_clipping_snaps_outwards_and_masks_the_polygon() -> None:
    grid = output_grid(open_safe(T29UNU), 60)
    left, _bottom, _right, top = grid.bounds
    inner = box(left + 1010, top - 9030, left + 7070, top - 2050)  # not on pixel edges
    triangle = shape(
        {
            "type": "Polygon",
            "coordinates": [
                [
                    (left + 1010, top - 9030),
                    (left + 7070, top - 9030),
                    (left + 1010, top - 2050),
                    (left + 1010, top - 9030),
                ]
            ],
        }
    )
    area = shape(transform_geom(grid.crs, "EPSG:4326", mapping(triangle)))
    clipped, local = clip_grid(grid, area)
    c_left, _bottom, _right, c_top = clipped.bounds
    # whole pixels of the parent grid, covering the area, at most a pixel more a side
    assert (c_left - left) % 60 == pytest.approx(0) and (top - c_top) % 60 == pytest.approx(0)
    margin = 60 + 1  # reprojection round trip
    assert c_left <= inner.bounds[0] + 1 and c_left > inner.bounds[0] - margin
    assert c_top >= inner.bounds[3] - 1 and c_top < inner.bounds[3] + margin
    full = area_mask(clipped, local, Window(0, 0, clipped.width, clipped.height))
    assert 0.4 < full.mean() < 0.65  # a right triangle fills half its box (plus edges)
    assert full[-1, 0] and not full[0, -1]  # the right angle is bottom-left
    # a window of the grid sees the same pixels as the whole mask there
    window = Window(20, 30, 50, 40)
    part = area_mask(clipped, local, window)
    assert (part == full[30:70, 20:70]).all()


def test_an_area_outside_the_product_is_its_error() -> None:
    grid = output_grid(open_safe(T29UNU), 60)
    with pytest.raises(ProductError, match="outside the product"):
        clip_grid(grid, box(10.0, 45.0, 10.5, 45.5))
