"""The COG writer: scratch strips in, a valid COG with its tags, colours and overviews out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rio_cogeo.cogeo import cog_validate

from kappamask.bands import CLASS_COLORS
from kappamask.grid import Grid
from kappamask.writers.cog import OverviewResampling, StripWriter, to_cog

SIZE = 2048


def _classes() -> np.ndarray:
    """Class 1 with every third pixel of every third row class 4: no 2 x 2 cell holds more
    than one 4, so a 'mode' overview is all 1 where an 'average' one makes (4 + 3) / 4."""
    plane = np.ones((SIZE, SIZE), dtype=np.uint8)
    plane[::3, ::3] = 4
    plane[:100, :100] = 0  # no data
    return plane


@pytest.mark.parametrize(("overviews", "colormap"), [("mode", True), ("average", False)])
def test_strips_become_a_valid_cog_with_tags_colours_and_overviews(
    tmp_path: Path, overviews: OverviewResampling, colormap: bool
) -> None:
    grid = Grid("EPSG:32629", Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5900000.0), SIZE, SIZE)
    plane = _classes()
    scratch = tmp_path / "scratch.tif"
    with StripWriter(scratch, grid, colormap=colormap) as writer:
        for top in range(0, SIZE, 500):  # strips that do not fall on block edges
            writer.write(top, plane[top : top + 500])
    out = tmp_path / "out.tif"
    to_cog(scratch, out, tags={"KAPPAMASK_MODEL": "m 1"}, overviews=overviews)

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
