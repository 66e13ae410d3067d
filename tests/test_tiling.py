"""The crop grid, crops with mirrored context at the raster's edges, and the blended mosaic."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kappamask.bands import TILE_OVERLAP, MaskClass
from kappamask.geometry.tiling import (
    Blender,
    Crop,
    CropGrid,
    block_of,
    cut,
    has_data,
    spans,
    with_context,
)
from kappamask.inference.model_spec import PROBABILITY_NODATA, SCORE_CLASSES, decide


@pytest.mark.parametrize("length", [1, 100, 511, 512, 513, 544, 1000, 1830, 5490, 10980])
@pytest.mark.parametrize("overlap", [0, 32, TILE_OVERLAP, 96])
def test_crops_reach_an_overlap_past_both_edges(length: int, overlap: int) -> None:
    """Every pixel, the outermost ones included, lies at least ``overlap`` pixels inside a
    crop (or as deep as a lone crop allows), the crops step by size - overlap, and the
    slack is split evenly between the two ends."""
    s = spans(length, 512, overlap)
    assert all(b.start - a.start == 512 - overlap for a, b in itertools.pairwise(s))
    head, tail = -s[0].start, s[-1].stop - length
    assert head >= overlap and tail >= overlap and abs(head - tail) <= 1
    assert len(s) == 1 or len(spans(length, 512, overlap)) - 1 < (length + overlap) / (
        512 - overlap
    )


def test_a_full_tile_costs_no_more_crops_than_cut_tiling_did() -> None:
    """10980 px with the paper's 32 px overlap: the 23 x 23 crops of the cut mosaic, now
    centred with 46 px of mirrored context at each edge instead of 92 px of zeros at one."""
    s = spans(10980, 512, 32)
    assert len(s) == 23 and s[0].start == -46 and s[-1].stop == 10980 + 46
    grid = CropGrid(10980, 10980)
    rows, cols = grid.boundaries()
    assert rows == cols and all(0 < b < 10980 for b in rows)


def test_invalid_overlap() -> None:
    with pytest.raises(ValueError):
        spans(100, 512, 31)
    with pytest.raises(ValueError):
        spans(0)


def test_weights_cross_fade_and_sum_to_one_everywhere() -> None:
    """Across the raster the crops' weights add up to 1: the blend of equal crops is the
    crops' value, and no pixel is left to one crop's border."""
    for length in (700, 1830):
        grid = CropGrid(length, length)
        total = np.zeros(length, np.float32)
        for span in grid.cols:
            lo, hi = span.clip(length)
            total[lo:hi] += grid.profile[lo - span.start : hi - span.start]
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
        # a crop's own weight is 1 away from its edges and small on them
        assert grid.profile[grid.overlap] == 1.0 and grid.profile[0] < 0.05


def _run(
    grid: CropGrid, scores_of: object, sent: object = None, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend crops whose scores ``scores_of(crop)`` gives (only those ``sent`` accepts);
    returns the mosaic's classes, confidence and probability, each row finished once."""
    blender = Blender(grid)
    valid = np.ones((grid.height, grid.width), bool) if valid is None else valid
    out = np.full((3, grid.height, grid.width), -1, np.int16)
    for row in range(len(grid.rows)):
        for crop in grid.row_crops(row):
            if sent is None or sent(crop):  # type: ignore[operator]
                blender.add(crop, scores_of(crop))  # type: ignore[operator]
        top, bottom = grid.rows[row].clip(grid.height)
        done = blender.finish(row, valid[top:bottom], top)
        h = done.classes.shape[0]
        assert (out[:, done.top : done.top + h] == -1).all()  # each row comes once
        out[:, done.top : done.top + h] = (done.classes, done.confidence, done.probability)
    assert (out >= 0).all()
    return out[0].astype(np.uint8), out[1].astype(np.uint8), out[2].astype(np.uint8)


def test_identity_crops_decide_as_the_whole_raster_would() -> None:
    """Crops cut from one raster of scores (mirrored past its edges) blend back into that
    raster: the mosaic decides every pixel as ``decide`` decides the raster itself."""
    rng = np.random.default_rng(0)
    height, width = 1100, 1000
    image = rng.integers(0, 256, size=(len(SCORE_CLASSES), height, width)).astype(np.uint8)
    grid = CropGrid(height, width)

    def scores_of(crop: Crop) -> np.ndarray:
        row = grid.row_crops(crop.row)
        block = block_of(grid, row)
        data = image[:, block.top : block.bottom, block.left : block.right]
        return cut(with_context(data, block, row), crop, row)

    classes, confidence, probability = _run(grid, scores_of)
    expected = decide(image)
    assert (classes == expected[0]).all()
    assert (confidence == np.maximum(expected[1], 1)).all()
    # a weighted mean of equal values may land a hair off a .5 percentage
    assert np.abs(probability.astype(int) - expected[2]).max() <= 1


def test_neighbours_that_disagree_cross_fade_over_their_overlap() -> None:
    """Left crop: all CLEAR; right crop: all CLOUD (both 200). The class changes once, in
    the middle of the overlap, and the winning score falls linearly to half and rises
    again across it (no step at a crop's edge)."""
    grid = CropGrid(512, 700)
    assert len(grid.cols) == 2

    def scores_of(crop: Crop) -> np.ndarray:
        scores = np.zeros((4, 512, 512), np.uint8)
        scores[0 if crop.col == 0 else 3] = 200
        return scores

    classes, confidence, probability = _run(grid, scores_of)
    line = classes[300]
    change = np.flatnonzero(line[1:] != line[:-1])
    right, left = grid.cols[1], grid.cols[0]
    middle = (right.start + left.stop) // 2
    assert len(change) == 1 and abs(change[0] + 1 - middle) <= 1
    assert line[0] == MaskClass.CLEAR and line[-1] == MaskClass.CLOUD
    zone = confidence[300, right.start : left.stop].astype(int)
    assert zone[0] >= 195 and zone[-1] >= 195 and abs(int(zone.min()) - 100) <= 3
    assert np.abs(np.diff(zone)).max() <= 8  # a ramp, no jump
    assert (probability[300, : right.start] == 0).all()
    assert (probability[300, left.stop :] == 100).all()


def test_crops_never_sent_leave_their_pixels_missing() -> None:
    """The no-data wedge: crops without data are not sent; pixels no crop covered, and
    pixels without data, are MISSING; pixels one neighbour covers keep its answer."""
    grid = CropGrid(512, 1400)

    def scores_of(crop: Crop) -> np.ndarray:
        levels = np.array([10, 20, 30, 200], np.uint8)[:, None, None]
        return np.broadcast_to(levels, (4, 512, 512))

    valid = np.ones((512, 1400), bool)
    valid[:10, :10] = False
    classes, confidence, probability = _run(grid, scores_of, lambda c: c.col == 0, valid)
    first = grid.cols[0]
    assert (classes[:, first.stop :] == MaskClass.MISSING).all()
    assert (probability[:, first.stop :] == PROBABILITY_NODATA).all()
    assert (confidence[:, first.stop :] == 0).all()
    assert (classes[:10, :10] == MaskClass.MISSING).all() and (confidence[:10, :10] == 0).all()
    known = classes[10:, : first.stop]
    assert (known == MaskClass.CLOUD).all() and (confidence[10:, : first.stop] == 200).all()
    assert (probability[10:, : first.stop] == round(100 * 200 / 220)).all()


def test_context_mirrors_the_raster_and_never_counts_as_data() -> None:
    strip = np.arange(3 * 300 * 700, dtype=np.float32).reshape(3, 300, 700) + 1
    grid = CropGrid(300, 700)
    row = grid.row_crops(0)
    block = block_of(grid, row)
    assert (block.top, block.bottom, block.left, block.right) == (0, 300, 0, 700)
    extended = with_context(strip, block, row)
    first = row[0]
    crop = cut(extended, first, row)
    assert crop.shape == (3, 512, 512)
    dy, dx = -first.y.start, -first.x.start
    assert (crop[:, dy : dy + 300, dx:] == strip[:, :, : 512 - dx]).all()
    # symmetric: the pixel before the edge repeats the edge pixel, then the next one in
    assert (crop[:, dy - 1, dx:] == crop[:, dy, dx:]).all()
    assert (crop[:, dy - 2, dx:] == crop[:, dy + 1, dx:]).all()
    assert (crop[:, dy:, dx - 1] == crop[:, dy:, dx]).all()
    # only real pixels decide whether a crop is sent
    valid = np.zeros((300, 700), bool)
    valid[:, :5] = True
    assert [has_data(valid, block, c) for c in row] == [c.x.start < 5 for c in row]
    valid[:] = False
    valid[299, 699] = True
    assert [has_data(valid, block, c) for c in row] == [c.x.stop > 699 for c in row]
