"""Windowed, resampled, normalised reads of real bands."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from kappamask.bands import L2A_FEATURES, L2A_MAX_V
from kappamask.errors import ProductError
from kappamask.geometry.grid import Grid, output_grid
from kappamask.reading import reader as reader_module
from kappamask.reading.reader import AlignedLayer, BandReader, BlockRows, WarpedLayer, normalise
from kappamask.sources import open_safe

from .conftest import T22HBD, T29UNU


def _raw(product_dir: Path, layer: str) -> np.ndarray:
    path = next(product_dir.glob(f"GRANULE/*/IMG_DATA/R60m/*_{layer}_60m.jp2"))
    with rasterio.open(path) as src:
        return src.read(1).astype(np.float32)


def test_normalise_follows_the_paper() -> None:
    dn = np.array([0, 1000, 1500, 65535], dtype=np.uint16)
    valid = np.ones(4, dtype=bool)
    out = normalise(dn, -1000.0, 0.5, out=np.empty(4, np.float32), valid=valid)
    expected = np.maximum((dn - 1000.0) / 65535.0 / 0.5, 0.0)
    assert out == pytest.approx(expected)
    assert out[1] == 0.0 and out[0] == 0.0  # negatives clipped, no data 0
    assert valid.tolist() == [False, True, True, True]  # DN 0 is no data
    # resampled values: NaN is no data, 0 is a value; the gain comes before the offset
    resampled = np.float32([[np.nan, 0.0, 3000.0]])
    valid = np.ones((1, 3), dtype=bool)
    out = normalise(resampled, -1000.0, 0.5, np.empty((1, 3), np.float32), gain=0.5, valid=valid)
    assert out[0] == pytest.approx([0.0, 0.0, (1500.0 - 1000.0) / 65535.0 / 0.5])
    assert valid.tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="float16 or float32"):
        normalise(dn, 0.0, 1.0, out=np.empty(3, np.float32))


def test_normalise_to_float16_rounds_as_numpy_casts() -> None:
    # Every 7th float32 from 0 to the largest float16 (rounding ties, subnormals, the
    # carry into the exponent), as DN with max_v 1 / 65535 so normalising is the identity.
    values = np.arange(0, 0x477FF000, 7, dtype=np.uint32).view(np.float32)
    values = np.concatenate([values, np.float32([65504.0, 65519.0, 1e9])])
    out = np.empty(values.shape, dtype=np.float16)
    normalise(values, 0.0, 1.0 / 65535.0, out=out)
    expected = np.minimum(values, 65504.0).astype(np.float16)
    assert np.array_equal(out.view(np.uint16), expected.view(np.uint16))
    # float32 output: the same numbers, before the rounding
    dn = np.float32([0.0, 1200.0, 65535.0])
    half, single = np.empty(3, np.float16), np.empty(3, np.float32)
    normalise(dn, -1000.0, 0.5, out=half)
    assert np.array_equal(half, normalise(dn, -1000.0, 0.5, out=single).astype(np.float16))


def test_grid_of_the_product_at_each_resolution() -> None:
    product = open_safe(T29UNU)
    grid = output_grid(product, 60)
    assert (grid.width, grid.height) == (544, 544)
    assert grid.transform.c == 538380.0 and grid.transform.f == 5869320.0
    assert (output_grid(product, 10).width, output_grid(product, 20).width) == (3264, 1632)
    # a resolution of no Sentinel-2 band is refused by RunOptions (tests/test_options.py)


def test_read_at_native_resolution_applies_offsets_by_band_name() -> None:
    product = open_safe(T29UNU)
    grid = output_grid(product, 60)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        features, valid = reader.read(Window(0, 0, grid.width, grid.height))
    assert features.shape == (13, 544, 544) and features.dtype == np.float32
    b02 = _raw(T29UNU, "B02")
    aot = _raw(T29UNU, "AOT")
    spectral = [f if f != "B08" else "B8A" for f in L2A_FEATURES if f not in ("AOT", "WVP")]
    expected_valid = np.logical_and.reduce([_raw(T29UNU, layer) > 0 for layer in spectral])
    assert (valid == expected_valid).all()
    assert 0.05 < (~valid).mean() < 0.2  # the no-data wedge
    i = L2A_FEATURES.index("B02")
    expected = np.maximum((b02 - 1000.0) / 65535.0 / L2A_MAX_V[i], 0.0)
    assert np.allclose(features[i][valid], expected[valid], atol=1e-5)
    # AOT is not a reflectance: no offset, ever (km_predict gave it B01's)
    j = L2A_FEATURES.index("AOT")
    assert np.allclose(features[j][valid], (aot / 65535.0 / L2A_MAX_V[j])[valid], atol=1e-5)
    assert (features[:, ~valid] == 0).all()
    # B08 comes from B8A for this 60 m-only product
    assert reader.layers["B08"] == "B8A"
    b08, b8a = L2A_FEATURES.index("B08"), L2A_FEATURES.index("B8A")
    assert np.allclose(features[b08], features[b8a] * (L2A_MAX_V[b8a] / L2A_MAX_V[b08]), rtol=1e-5)


@pytest.mark.parametrize("resampling", ["lanczos", "bilinear"])
def test_upsampling_keeps_nodata_out_of_the_kernel(resampling: str) -> None:
    product = open_safe(T29UNU)
    grid = output_grid(product, 20)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid, resampling) as reader:
        features, valid = reader.read(Window(0, 0, grid.width, grid.height))
    assert features.shape == (13, 1632, 1632)
    assert 0.05 < (~valid).mean() < 0.2
    # no ringing of the 0-DN wedge into valid pixels: values stay in the band's range
    assert features[:, valid].min() >= 0.0
    assert features[L2A_FEATURES.index("B02")][valid].max() < 1.5


def test_resampling_from_coarser_files_of_a_full_layout() -> None:
    product = open_safe(T22HBD)
    grid = output_grid(product, 60)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        assert reader.layers["B08"] == "B08"
        features, valid = reader.read(Window(0, 0, 64, 64))
    assert features.shape == (13, 64, 64) and valid.any()


def test_missing_band_is_named(product_copy: Path) -> None:
    for path in product_copy.glob("GRANULE/*/IMG_DATA/R60m/*_B11_60m.jp2"):
        path.unlink()
    product = open_safe(product_copy)
    with pytest.raises(ProductError, match="lacks band\\(s\\) B11"):
        BandReader(product, L2A_FEATURES, L2A_MAX_V, output_grid(product, 60))


def test_corrupt_jp2_is_a_clear_error(product_copy: Path) -> None:
    path = next(product_copy.glob("GRANULE/*/IMG_DATA/R60m/*_B03_60m.jp2"))
    path.write_bytes(path.read_bytes()[:3000])
    product = open_safe(product_copy)
    grid = output_grid(product, 60)
    with (
        pytest.raises(ProductError, match="B03"),
        BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader,
    ):
        reader.read(Window(0, 0, grid.width, grid.height))


def test_l1c_bands_at_every_resolution(l1c_safe: Path) -> None:
    from kappamask.bands import L1C_FEATURES, L1C_MAX_V

    product = open_safe(l1c_safe)
    for resolution, size in ((60, 18), (20, 54), (10, 108)):
        grid = output_grid(product, resolution)
        with BandReader(product, L1C_FEATURES, L1C_MAX_V, grid) as reader:
            features, valid = reader.read(Window(0, 0, grid.width, grid.height))
        assert features.shape == (13, size, size) and valid.all()
        assert 0.0 < features.mean() < 2.0


@pytest.mark.parametrize(
    ("resolution", "resampling"),
    [
        (60, "lanczos"),
        (20, "lanczos"),  # the whole 10 m raster: end to end, slow
        pytest.param(10, "lanczos", marks=pytest.mark.slow),
        pytest.param(10, "bilinear", marks=pytest.mark.slow),
    ],
)
def test_aligned_bands_skip_the_warp_and_keep_its_values(
    monkeypatch: pytest.MonkeyPatch, resolution: int, resampling: str
) -> None:
    """Bands on the grid are read as they are, coarser ones upsampled: GDAL's values."""
    product = open_safe(T29UNU)
    grid = output_grid(product, resolution)
    scale = 60 // resolution
    window = Window(100 * scale, 200 * scale, 300 * scale, 250 * scale)  # crosses the wedge
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid, resampling) as reader:
        assert all(isinstance(v, AlignedLayer) for v in reader.sources.values())
        assert {v.factor for v in reader.sources.values()} == {scale}  # type: ignore[union-attr]
        fast, fast_valid = reader.read(window)
    monkeypatch.setattr(reader_module, "alignment", lambda src, grid: 0)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid, resampling) as reader:
        assert all(isinstance(v, WarpedLayer) for v in reader.sources.values())
        warped, warped_valid = reader.read(window)
    # GDAL blanks a few more pixels along the no-data edge than the rule "valid where the
    # source pixel underneath is valid"; everywhere else the validity is the same.
    assert (fast_valid | ~warped_valid).all()
    assert (fast_valid != warped_valid).mean() < 1e-3
    both = fast_valid & warped_valid
    np.testing.assert_allclose(fast[:, both], warped[:, both], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("resolution", [60, pytest.param(10, marks=pytest.mark.slow)])
def test_strips_read_the_same_as_the_whole(resolution: int) -> None:
    """Each strip reads its own kernel margin: no seam where strips meet.

    Equal to float32 rounding only: a strip without no-data normalises by the separable
    weight sum, the whole (with the wedge) by the filtered validity.
    """
    product = open_safe(T29UNU)
    grid = output_grid(product, resolution)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        full, _ = reader.read(Window(0, 0, grid.width, grid.height))
        for row in (0, 509, grid.height - 37):
            height = min(512, grid.height - row)
            part, _ = reader.read(Window(0, row, grid.width, height))
            np.testing.assert_allclose(part, full[:, row : row + height], rtol=1e-6, atol=1e-7)


def test_finer_bands_are_averaged_onto_a_coarser_grid() -> None:
    """A band finer than the grid is the mean of its valid pixels under each output pixel."""
    product = open_safe(T29UNU)
    fine = output_grid(product, 60)
    t = fine.transform
    grid = Grid(fine.crs, Affine(360.0, 0.0, t.c, 0.0, -360.0, t.f), 91, 91)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        assert {v.factor for v in reader.sources.values()} == {-6}  # type: ignore[union-attr]
        features, valid = reader.read(Window(0, 0, 91, 91))
        part, _ = reader.read(Window(10, 37, 50, 40))
    b02 = np.pad(_raw(T29UNU, "B02"), ((0, 2), (0, 2)))  # 544 px: the last cells are partial
    cells = np.where(b02 > 0, b02, np.nan).reshape(91, 6, 91, 6)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(cells, axis=(1, 3))
    i = L2A_FEATURES.index("B02")
    expected = np.maximum((mean - 1000.0) / 65535.0 / L2A_MAX_V[i], 0.0)
    assert valid.any() and (~valid).any()
    np.testing.assert_allclose(features[i][valid], expected[valid], rtol=1e-5)
    assert np.array_equal(part, features[:, 37:77, 10:60])


def test_block_rows_decode_each_tile_once_as_windows_reach_it(tmp_path: Path) -> None:
    """A tiled file (blocks in both directions, partial ones at the edges): overlapping
    strips read in chunks side by side get the file's values, each block decoded once and
    only when a window first touches it; a window above the kept rows reads them again."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 4, (300, 230), dtype=np.uint16) * 1000  # DN 0 = no data
    path = tmp_path / "tiled.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=230,
        height=300,
        count=1,
        dtype="uint16",
        tiled=True,
        blockxsize=64,
        blockysize=64,
        crs="EPSG:32629",
        transform=Affine(10, 0, 500000, 0, -10, 6000000),
    ) as dst:
        dst.write(data, 1)
    with rasterio.open(path) as src:
        rows = BlockRows(src)
        calls: list[tuple[int, int, int, int]] = []
        original = rows._decode

        def counting(top: int, bottom: int, left: int, right: int) -> None:
            calls.append((top, bottom, left, right))
            original(top, bottom, left, right)

        rows._decode = counting  # type: ignore[method-assign]
        counts = np.zeros(data.shape, dtype=int)
        for top in range(0, 300, 50):  # strips of 60 rows, 10 of overlap
            for left in range(0, 230, 70):  # chunks of 80 columns, 10 of overlap
                window = Window(left, top, min(80, 230 - left), min(60, 300 - top))
                before = len(calls)
                got = rows.read(window)
                for t, b, lft, r in calls[before:]:
                    counts[t:b, lft:r] += 1
                    assert t % 64 == 0 or t == top  # whole blocks, or the kept part of one
                    assert lft % 64 == 0 and (r % 64 == 0 or r == 230)
                    assert lft < left + window.width and r > left  # only blocks it touches
                np.testing.assert_array_equal(got, data[window.toslices()])
        assert (counts == 1).all()
        assert len(calls) < 5 * 4 * 2  # side by side undecoded blocks go in one read
        again = rows.read(Window(0, 0, 230, 20))
        assert np.array_equal(again, data[:20])


def test_a_walk_down_the_strips_decodes_every_pixel_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strips overlap and cut through JPEG 2000 tiles, chunks decode the blocks they reach,
    yet no band pixel is decoded twice and every one is decoded."""
    decoded: dict[str, np.ndarray] = {}
    original = BlockRows._decode

    def counting(self: BlockRows, top: int, bottom: int, left: int, right: int) -> None:
        counts = decoded.setdefault(self.src.name, np.zeros(self.src.shape, dtype=int))
        counts[top:bottom, left:right] += 1
        original(self, top, bottom, left, right)

    monkeypatch.setattr(BlockRows, "_decode", counting)
    product = open_safe(T29UNU)
    grid = output_grid(product, 10)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        for row in range(0, grid.height, 480):
            for col in range(0, grid.width, 6 * 480):  # chunks side by side share the rows
                width = min(6 * 480 + 32, grid.width - col)
                reader.read(Window(col, row, width, min(512, grid.height - row)))
        assert reader.decode_seconds > 0
    assert len(decoded) == 12  # 13 features, B08 read from the B8A file
    for name, counts in decoded.items():
        assert (counts == 1).all(), name


@pytest.mark.parametrize("level", ["L1C", "L2A"])
def test_the_offset_rule_is_the_served_model_s(level: str, tmp_path: Path) -> None:
    """``training`` adds the baseline-04.00 offset to the DN (the scale of the training
    products); ``km_predict`` does what km_predict v2.4 does: the L1C offset also shifts the
    divisor, L2A gets none. T29UNU (L2A, baseline 04.00, BOA offset -1000) is real; its
    bands as an L1C product stand in for an L1C one with RADIO_ADD_OFFSET -1000."""
    import dataclasses

    from kappamask.inference.model_spec import OFFSET_KM_PREDICT, OFFSET_TRAINING

    product = open_safe(T29UNU)
    assert product.offsets["B04"] == -1000.0
    if level == "L1C":
        product = dataclasses.replace(product, level="L1C")
    grid = output_grid(product, 60)
    window = Window(0, 0, grid.width, grid.height)
    features, max_v = ("B02", "B04", "B11"), (0.25, 0.25, 0.3)
    read = {}
    for rule in (OFFSET_TRAINING, OFFSET_KM_PREDICT):
        with BandReader(product, features, max_v, grid, offset_rule=rule) as reader:
            read[rule], valid = reader.read(window)
    for i, band in enumerate(features):
        dn = read[OFFSET_TRAINING][i] * max_v[i] * 65535 + 1000  # the DN, back from training
        bright = valid & (dn > 1200)  # never clipped at 0 under either rule
        assert bright.mean() > 0.5
        if level == "L2A":
            expected = dn / 65535 / max_v[i]
        else:
            expected = (dn - 1000) / (65535 * max_v[i] - 1000)
        np.testing.assert_allclose(
            read[OFFSET_KM_PREDICT][i][bright], expected[bright], rtol=1e-5, err_msg=band
        )
