"""Windowed, resampled, normalised reads of real bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from kappamask.bands import L2A_FEATURES, L2A_MAX_V
from kappamask.errors import InvalidInputError, ProductError
from kappamask.reader import BandReader, normalise, output_grid
from kappamask.sources import open_safe

from .conftest import T22HBD, T29UNU


def _raw(product_dir: Path, layer: str) -> np.ndarray:
    path = next(product_dir.glob(f"GRANULE/*/IMG_DATA/R60m/*_{layer}_60m.jp2"))
    with rasterio.open(path) as src:
        return src.read(1).astype(np.float32)


def test_normalise_follows_the_paper() -> None:
    dn = np.array([0.0, 1000.0, 1500.0, 66535.0], dtype=np.float32)
    out = normalise(dn.copy(), -1000.0, 0.5)
    expected = np.maximum((dn - 1000.0) / 65535.0 / 0.5, 0.0)
    assert out == pytest.approx(expected)
    assert out[1] == 0.0 and out[0] == 0.0  # negatives clipped


def test_grid_of_the_product_at_each_resolution() -> None:
    product = open_safe(T29UNU)
    grid = output_grid(product, 60)
    assert (grid.width, grid.height) == (544, 544)
    assert grid.transform.c == 538380.0 and grid.transform.f == 5869320.0
    assert (output_grid(product, 10).width, output_grid(product, 20).width) == (3264, 1632)
    with pytest.raises(InvalidInputError):
        output_grid(product, 30)


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


def test_windowed_read_matches_the_full_read() -> None:
    product = open_safe(T29UNU)
    grid = output_grid(product, 60)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        full, _ = reader.read(Window(0, 0, grid.width, grid.height))
        part, _ = reader.read(Window(100, 200, 300, 150))
    assert np.array_equal(part, full[:, 200:350, 100:400])


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


def test_bands_on_the_grid_skip_the_warp_without_changing_a_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    product = open_safe(T29UNU)
    grid = output_grid(product, 60)
    window = Window(100, 200, 300, 250)  # crosses the no-data wedge's edge
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        assert not any(isinstance(v, WarpedVRT) for v in reader._vrts.values())
        direct = reader.read(window)
    monkeypatch.setattr(BandReader, "_on_grid", lambda self, src: False)
    with BandReader(product, L2A_FEATURES, L2A_MAX_V, grid) as reader:
        assert all(isinstance(v, WarpedVRT) for v in reader._vrts.values())
        warped = reader.read(window)
    assert (direct[1] == warped[1]).all()
    np.testing.assert_allclose(direct[0], warped[0], atol=1e-6)
