"""The COG writer: scratch strips in, a valid COG with its tags, colours and overviews out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rio_cogeo.cogeo import cog_validate

from kappamask.bands import CLASS_COLORS
from kappamask.geometry.grid import Grid
from kappamask.writers.cog import (
    OverviewResampling,
    StripWriter,
    overview_factors,
    overview_path,
    scratch_files,
    to_cog,
)

SIZE = 2048


def _classes() -> np.ndarray:
    """Class 1 with every third pixel of every third row class 4: no 2 x 2 cell holds more
    than one 4, so a 'mode' overview is all 1 where an 'average' one makes (4 + 3) / 4."""
    plane = np.ones((SIZE, SIZE), dtype=np.uint8)
    plane[::3, ::3] = 4
    plane[:100, :100] = 0  # no data
    return plane


def _grid(width: int, height: int) -> Grid:
    return Grid("EPSG:32629", Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5900000.0), width, height)


@pytest.mark.parametrize(("overviews", "colormap"), [("mode", True), ("average", False)])
@pytest.mark.parametrize("in_strips", [True, False], ids=["levels-from-strips", "levels-by-gdal"])
def test_strips_become_a_valid_cog_with_tags_colours_and_overviews(
    tmp_path: Path, overviews: OverviewResampling, colormap: bool, in_strips: bool
) -> None:
    grid = _grid(SIZE, SIZE)
    plane = _classes()
    scratch = tmp_path / "scratch.tif"
    levels = overviews if in_strips else None
    with StripWriter(scratch, grid, colormap=colormap, overviews=levels) as writer:
        for top in range(0, SIZE, 500):  # strips that do not fall on block edges
            writer.write(top, plane[top : top + 500])
    out = tmp_path / "out.tif"
    to_cog(scratch, out, tags={"KAPPAMASK_MODEL": "m 1"}, overviews=overviews)
    assert len(scratch_files(scratch)) == (3 if in_strips else 1)  # and no VRT left
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".vrt") == []

    ok, errors, _warnings = cog_validate(str(out), quiet=True)
    assert ok, errors
    with rasterio.open(out) as src:
        assert np.array_equal(src.read(1), plane)
        assert src.tags()["KAPPAMASK_MODEL"] == "m 1"
        assert src.nodata == 0 and src.crs.to_epsg() == 32629
        assert src.block_shapes[0] == (512, 512)
        assert src.compression.name.lower() == "deflate"
        assert src.overviews(1) == [2, 4]
        if colormap:
            assert src.colormap(1)[4] == CLASS_COLORS[4]
        half = src.read(1, out_shape=(SIZE // 2, SIZE // 2))
    assert (half[:50, :50] == 0).all()  # no data stays no data
    if overviews == "mode":  # the majority class of each 2 x 2 cell, never a blend
        assert (half[50:, 50:] == 1).all()
    else:
        assert set(np.unique(half[50:, 50:])) == {1, 2}


def _cells(plane: np.ndarray, nodata: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2 x 2 cells of ``plane`` (padded with nodata) as [h, w, 4], and which hold data."""
    h, w = -(-plane.shape[0] // 2), -(-plane.shape[1] // 2)
    padded = np.full((2 * h, 2 * w), nodata, dtype=np.int64)
    padded[: plane.shape[0], : plane.shape[1]] = plane
    cells = padded.reshape(h, 2, w, 2).transpose(0, 2, 1, 3).reshape(h, w, 4)
    return cells, cells != nodata


def _average(plane: np.ndarray, nodata: int) -> np.ndarray:
    cells, ok = _cells(plane, nodata)
    n = ok.sum(axis=2)
    total = np.where(ok, cells, 0).sum(axis=2)
    return np.where(n > 0, (total + n // 2) // np.maximum(n, 1), nodata).astype(np.uint8)


def _mode(plane: np.ndarray, nodata: int) -> np.ndarray:
    """The most frequent value with data of each cell; of equally frequent ones the higher."""
    cells, ok = _cells(plane, nodata)
    best = np.full(cells.shape[:2], nodata, dtype=np.uint8)
    best_count = np.zeros(cells.shape[:2], dtype=np.int64)
    for value in np.unique(plane[plane != nodata]):  # ascending: a tie goes to the later
        count = ((cells == value) & ok).sum(axis=2)
        take = (count >= best_count) & (count > 0)
        best[take], best_count[take] = value, count[take]
    return best


@pytest.mark.parametrize("rule", ["mode", "average", "nearest"])
def test_levels_built_from_strips_of_any_height_follow_the_rule(
    tmp_path: Path, rule: OverviewResampling
) -> None:
    """Odd sizes (partial cells at the edges), strips of any height, nodata kept out; with
    five values in four pixels, many cells are ties."""
    width, height, nodata = 2301, 1100, 255
    rng = np.random.default_rng(3)
    plane = rng.integers(0, 5, (height, width), dtype=np.uint8) * 20
    plane[rng.random((height, width)) < 0.2] = nodata
    plane[:40, :40] = nodata  # cells with no data at all
    assert overview_factors(width, height) == [2, 4, 8]
    reference = plane
    expected = []
    for _factor in (2, 4, 8):
        if rule == "nearest":
            reference = reference[::2, ::2]
        else:
            reference = (_mode if rule == "mode" else _average)(reference, nodata)
        expected.append(reference)
    for strip in (37, 512, height):
        scratch = tmp_path / f"scratch{strip}.tif"
        with StripWriter(scratch, _grid(width, height), nodata=nodata, overviews=rule) as writer:
            for top in range(0, height, strip):
                writer.write(top, plane[top : top + strip])
        for factor, want in zip((2, 4, 8), expected, strict=True):
            with rasterio.open(overview_path(scratch, factor)) as level:
                assert level.transform.a == 10.0 * factor
                assert np.array_equal(level.read(1), want), (strip, factor)


def test_overview_levels_need_the_rows_in_order(tmp_path: Path) -> None:
    with StripWriter(tmp_path / "s.tif", _grid(1100, 1100), overviews="mode") as writer:
        writer.write(0, np.ones((100, 1100), np.uint8))
        with pytest.raises(ValueError, match="rows in order"):
            writer.write(300, np.ones((100, 1100), np.uint8))
