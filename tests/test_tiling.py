"""The crop grid, crop extraction and the mosaic of crop centres."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kappamask.tiling import Crop, CropGrid, extract, place, spans


@pytest.mark.parametrize("length", [1, 100, 511, 512, 513, 544, 1000, 1830, 5490, 10980])
def test_kept_parts_cover_every_pixel_exactly_once(length: int) -> None:
    covered = np.zeros(length, dtype=int)
    for span in spans(length):
        assert span.start <= span.keep_start < span.keep_stop <= span.start + 512
        covered[span.keep_start : span.keep_stop] += 1
    assert (covered == 1).all()


def test_full_tile_has_529_crops_with_32px_overlap() -> None:
    s = spans(10980)
    assert len(s) == 23 and len(CropGrid(10980, 10980)) == 529
    assert all(b.start - a.start == 480 for a, b in itertools.pairwise(s))
    # neighbours meet halfway through their 32 px overlap
    assert s[0].keep_stop == 496 and s[1].keep_start == 496
    # the last crop runs past the edge (zero padding) and keeps up to the edge
    assert s[-1].start + 512 > 10980 and s[-1].keep_stop == 10980


def test_edges_keep_their_border_inner_sides_drop_16px() -> None:
    first, middle, last = spans(1830)[0], spans(1830)[1], spans(1830)[-1]
    assert first.keep_start == 0
    assert middle.keep_start - middle.start == 16
    assert middle.start + 512 - middle.keep_stop == 16
    assert last.keep_stop == 1830


def test_invalid_overlap() -> None:
    with pytest.raises(ValueError):
        spans(100, 512, 31)
    with pytest.raises(ValueError):
        spans(0)


def test_extract_pads_with_zeros_at_right_and_bottom() -> None:
    strip = np.arange(3 * 300 * 700, dtype=np.float32).reshape(3, 300, 700) + 1
    grid = CropGrid(300, 700)
    last = grid.cols[-1]
    crop = extract(strip, last)
    assert crop.shape == (3, 512, 512)
    width = 700 - last.start
    assert (crop[:, :300, :width] == strip[:, :, last.start :]).all()
    assert (crop[:, 300:, :] == 0).all() and (crop[:, :, width:] == 0).all()


def test_mosaic_of_identity_crops_rebuilds_the_raster() -> None:
    rng = np.random.default_rng(0)
    height, width = 1100, 1000
    image = rng.integers(1, 5, size=(height, width), dtype=np.uint8)
    grid = CropGrid(height, width)
    out = np.zeros_like(image)
    for r, y in enumerate(grid.rows):
        strip = image[y.start : y.start + 512]
        kept = np.zeros((y.keep_stop - y.keep_start, width), dtype=np.uint8)
        for crop in grid.row_crops(r):
            place(kept, extract(strip, crop.x), crop, y.keep_start)
        out[y.keep_start : y.keep_stop] = kept
    assert (out == image).all()


def test_mosaic_takes_each_pixel_from_the_crop_where_it_is_central() -> None:
    grid = CropGrid(600, 600)
    out = np.zeros((600, 600), dtype=np.uint8)
    for crop in grid:
        tile = np.full((512, 512), 1 + crop.row * 2 + crop.col, dtype=np.uint8)
        place(out[crop.y.keep_start : crop.y.keep_stop], tile, crop, crop.y.keep_start)
    assert out[495, 495] == 1 and out[496, 495] == 3 and out[495, 496] == 2 and out[599, 599] == 4
    assert isinstance(next(iter(grid)), Crop)


def test_only_crops_with_data_are_worth_sending() -> None:
    """The no-data wedge: a crop without one valid pixel is not sent; one pixel is enough,
    and the zero padding past the raster's edge never counts as data."""
    from kappamask.tiling import has_data

    grid = CropGrid(512, 1400)
    valid = np.zeros((512, 1400), bool)
    valid[:, :700] = True  # the left half has data
    sent = [has_data(valid, crop.x) for crop in grid.row_crops(0)]
    starts = [crop.x.start for crop in grid.row_crops(0)]
    assert sent == [start < 700 for start in starts]
    valid[:] = False
    valid[511, 1399] = True  # the last pixel of the last crop
    assert [has_data(valid, crop.x) for crop in grid.row_crops(0)] == [False] * (
        len(starts) - 1
    ) + [True]
