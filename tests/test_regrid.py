"""Integer-factor upsampling against a per-pixel evaluation of the warper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kappamask.reading.regrid import RADIUS, downsample, phase_taps, upsample


def _per_pixel(source: np.ndarray, factor: int, kernel: str) -> np.ndarray:
    """Each output pixel from its own taps: sum(w v) / sum(w) over valid source pixels."""
    radius = RADIUS[kernel]

    def weight(x: float) -> float:
        if kernel == "bilinear":
            return max(0.0, 1.0 - abs(x))
        if abs(x) >= radius:
            return 0.0
        return float(np.sinc(x) * np.sinc(x / radius))

    h, w = source.shape
    out = np.full((h * factor, w * factor), np.nan)
    for r in range(h * factor):
        for c in range(w * factor):
            y, x = (r + 0.5) / factor - 0.5, (c + 0.5) / factor - 0.5
            if np.isnan(source[r // factor, c // factor]):
                continue
            total = acc = 0.0
            for i in range(math.floor(y) - radius + 1, math.floor(y) + radius + 1):
                for j in range(math.floor(x) - radius + 1, math.floor(x) + radius + 1):
                    if 0 <= i < h and 0 <= j < w and not np.isnan(source[i, j]):
                        wt = weight(i - y) * weight(j - x)
                        total += wt
                        acc += wt * source[i, j]
            if total >= 1e-6:
                out[r, c] = acc / total
    return out


@pytest.mark.parametrize("factor", [2, 3, 6])
@pytest.mark.parametrize("kernel", ["lanczos", "bilinear"])
@pytest.mark.parametrize("holes", [True, False])
def test_matches_the_per_pixel_formula(factor: int, kernel: str, holes: bool) -> None:
    rng = np.random.default_rng(factor)
    source = rng.uniform(100.0, 5000.0, (9, 11)).astype(np.float32)
    if holes:  # a hole and a no-data corner; without them, the edges are the only limit
        source[0, 4] = source[5:, 8:] = np.nan
    size = (9 * factor, 11 * factor)
    fast = upsample(source, factor, kernel, (0, size[0]), (0, size[1]))
    slow = _per_pixel(source.astype(np.float64), factor, kernel)
    assert (np.isnan(fast) == np.isnan(slow)).all()
    # float32 sums: a few 1e-5 of the data range where valid weights nearly cancel
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=0.05, equal_nan=True)


def test_a_window_with_an_origin_equals_the_same_part_of_the_whole() -> None:
    rng = np.random.default_rng(1)
    source = rng.uniform(0.0, 1.0, (40, 30)).astype(np.float32)
    whole = upsample(source, 2, "lanczos", (0, 80), (0, 60))
    part = upsample(source[10:30, 5:25], 2, "lanczos", (28, 51), (17, 33), origin=(10, 5))
    assert np.array_equal(part, whole[28:51, 17:33])


def test_flat_field_stays_flat_and_taps_are_those_of_the_kernel() -> None:
    flat = np.full((12, 12), 1234.0, dtype=np.float32)
    np.testing.assert_allclose(upsample(flat, 6, "lanczos", (0, 72), (0, 72)), 1234.0, rtol=1e-6)
    first, weights = phase_taps(2, "lanczos")
    # 10 m pixel 0 sits a quarter of a 20 m pixel before the centre of 20 m pixel 0,
    # which is its fourth tap (taps start 3 pixels before it).
    assert first.tolist() == [-3, -2]
    assert weights[0][3] == pytest.approx(np.sinc(0.25) * np.sinc(0.25 / 3))
    with pytest.raises(ValueError):
        phase_taps(0, "lanczos")


def test_downsample_is_the_mean_of_valid_pixels_and_windows_agree() -> None:
    rng = np.random.default_rng(2)
    source = rng.uniform(0.0, 1.0, (30, 24)).astype(np.float32)
    source[:6, :6] = np.nan  # one coarse cell without data
    source[6, 6] = np.nan  # one with a gap
    whole = downsample(source, 3, (0, 10), (0, 8))
    assert np.isnan(whole[:2, :2]).all()
    assert whole[2, 2] == pytest.approx(np.nanmean(source[6:9, 6:9]), rel=1e-6)
    assert whole[5, 7] == pytest.approx(source[15:18, 21:24].mean(), rel=1e-6)
    part = downsample(source[9:, 6:], 3, (3, 10), (2, 8), origin=(9, 6))
    assert np.array_equal(part, whole[3:10, 2:8], equal_nan=True)
    # beyond the source: no data
    assert np.isnan(downsample(source, 3, (9, 11), (0, 8))[1]).all()
