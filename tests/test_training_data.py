"""Training data sources and `kappamask evaluate`: composites with exact labels, a
KappaSet-style NetCDF stand-in, label rasters, metrics and reports checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import h5netcdf
import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner

from kappamask.bands import L1C_FEATURES, L1C_MAX_V, L2A_FEATURES, L2A_MAX_V, MaskClass
from kappamask.cli import main
from kappamask.errors import InvalidInputError, ProductError
from kappamask.geometry.grid import Grid
from kappamask.tools.composites import THICK_CLOUD, CompositeConfig, compose, fractal_field
from kappamask.tools.datasets import KappaSetSource, Scene, SceneSource, read_label_raster
from kappamask.tools.evaluate import evaluate, format_table

from .conftest import T29UNU, make_l1c_safe


def _write_labels(path: Path, grid: Grid, labels: np.ndarray) -> None:
    """A one-band uint8 GeoTIFF of ``labels`` on ``grid``."""
    with rasterio.open(path, "w", driver="GTiff", count=1, dtype="uint8", **grid.warp) as dst:
        dst.write(labels, 1)


@pytest.fixture(scope="module")
def l1c_scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    safe = make_l1c_safe(tmp_path_factory.mktemp("l1c"))
    return Scene.load(safe, L1C_FEATURES, L1C_MAX_V, 10)


def test_composites_have_exact_plausible_labels(l1c_scene: Scene) -> None:
    rng = np.random.default_rng(4)
    feats, valid = l1c_scene.features, l1c_scene.valid
    config = CompositeConfig(thick_cover=(0.3, 0.3), thin_cover=(0.3, 0.3))
    out, labels = compose(
        feats, valid, L1C_FEATURES, L1C_MAX_V, rng, config, sun_azimuth=90.0, sun_zenith=45.0
    )
    present = set(np.unique(labels[valid]).tolist())
    assert present == {1, 2, 3, 4}, present
    assert out.shape == feats.shape and labels.shape == valid.shape
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    to_refl = np.asarray(L1C_MAX_V)[:, None] * 65535 / 10000
    refl_in = feats[:, valid] * to_refl
    refl_out = out[:, valid] * to_refl
    lab = labels[valid]
    b02, b10 = L1C_FEATURES.index("B02"), L1C_FEATURES.index("B10")
    # clear pixels are untouched
    clear = lab == MaskClass.CLEAR
    np.testing.assert_allclose(refl_out[:, clear], refl_in[:, clear], atol=1e-5)
    # opaque cloud: bright, close to the cloud spectrum
    cloud = lab == MaskClass.CLOUD
    assert np.median(refl_out[b02, cloud]) > 0.4
    assert np.median(refl_out[b02, cloud]) == pytest.approx(THICK_CLOUD["B02"], rel=0.25)
    # cirrus shows in B10
    semi = lab == MaskClass.SEMI_TRANSPARENT_CLOUD
    assert np.median(refl_out[b10, semi]) > np.median(refl_in[b10, semi]) + 0.005
    # shadows are darker than the surface
    shadow = lab == MaskClass.CLOUD_SHADOW
    assert np.median(refl_out[b02, shadow] / np.maximum(refl_in[b02, shadow], 1e-4)) < 0.9


def test_shadows_fall_away_from_the_sun() -> None:
    """A single cloud, sun in the east (azimuth 90): the shadow is west of the cloud."""
    h = w = 128
    feats = np.full((13, h, w), 0.3, np.float32)
    rng = np.random.default_rng(0)
    config = CompositeConfig(thick_cover=(0.1, 0.1), thin_cover=(0.0, 0.0))
    _, labels = compose(
        feats,
        np.ones((h, w), bool),
        L1C_FEATURES,
        L1C_MAX_V,
        rng,
        config,
        sun_azimuth=90.0,
        sun_zenith=60.0,
    )
    cols = np.nonzero(labels >= MaskClass.SEMI_TRANSPARENT_CLOUD)[1]
    shadow_cols = np.nonzero(labels == MaskClass.CLOUD_SHADOW)[1]
    assert cols.size and shadow_cols.size
    assert shadow_cols.mean() < cols.mean()
    field = fractal_field((64, 64), np.random.default_rng(1))
    assert field.min() == 0.0 and field.max() == 1.0


def _write_kappaset_tile(path: Path, features: tuple[str, ...], rng: np.random.Generator) -> None:
    """One sub-tile in the KappaSet layout: a NetCDF4 file, one variable per band (DN) and
    a Label variable (mask codes), on dimensions y/x."""
    with h5netcdf.File(path, "w") as nc:
        nc.dimensions = {"y": 64, "x": 64}
        for band in features:
            var = nc.create_variable(band, ("y", "x"), np.uint16)
            var[...] = rng.integers(0, 12000, (64, 64)).astype(np.uint16)
        label = nc.create_variable("Label", ("y", "x"), np.uint8)
        label[...] = rng.integers(0, 6, (64, 64)).astype(np.uint8)


def test_kappaset_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(5):
        _write_kappaset_tile(tmp_path / f"T29UNU_2022_{i}.nc", L2A_FEATURES, rng)
    source = KappaSetSource(tmp_path, L2A_FEATURES, L2A_MAX_V, 0.2, seed=0)
    assert len(source.train_part) == 4 and len(source.hold_part) == 1
    feats, labels = source.read(source.train_part[0])
    with h5netcdf.File(source.train_part[0], "r") as nc:
        b03 = np.asarray(nc.variables["B03"][...], np.float64)
    i = L2A_FEATURES.index("B03")
    np.testing.assert_allclose(feats[i], b03 / 65535 / L2A_MAX_V[i], rtol=1e-6)
    assert labels.max() <= 5
    x, y = source.train_crop(32, rng)
    assert x.shape == (13, 32, 32) and y.shape == (32, 32)
    (tmp_path / "bad.nc").write_bytes(b"")
    with h5netcdf.File(tmp_path / "bad.nc", "w") as nc:
        nc.dimensions = {"y": 4, "x": 4}
        nc.create_variable("B01", ("y", "x"), np.uint16)
    with pytest.raises(ProductError, match="lacks"):
        source.read(tmp_path / "bad.nc")


def _write_mask(path: Path, data: np.ndarray, origin: tuple[float, float] = (500000, 6000000)):
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype="uint8",
        crs="EPSG:32629",
        transform=Affine(60, 0, origin[0], 0, -60, origin[1]),
    ) as dst:
        dst.write(data, 1)


def test_label_raster_on_the_product_grid(tmp_path: Path) -> None:
    scene = Scene.load(T29UNU, L2A_FEATURES, L2A_MAX_V, 60)
    labels = np.full((scene.grid.height, scene.grid.width), MaskClass.CLOUD, np.uint8)
    path = tmp_path / "labels.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=scene.grid.width,
        height=scene.grid.height,
        count=1,
        dtype="uint8",
        crs=scene.grid.crs,
        transform=scene.grid.transform,
    ) as dst:
        dst.write(labels, 1)
    read = read_label_raster(path, scene.grid)
    source = SceneSource(scene, read, 0.2, "labels")
    _feats, ref = source.holdout()
    assert (ref[scene.valid[source.hold_part]] == MaskClass.CLOUD).all()
    assert (ref[~scene.valid[source.hold_part]] == MaskClass.MISSING).all()


def test_evaluate_tables_json_and_png(tmp_path: Path) -> None:
    ref = np.array([[1, 1, 2, 4], [4, 5, 0, 3]], np.uint8)
    pred = np.array([[1, 2, 2, 4], [3, 4, 4, 0]], np.uint8)
    _write_mask(tmp_path / "pred.tif", pred)
    _write_mask(tmp_path / "ref.tif", ref)
    result = evaluate([tmp_path / "pred.tif"], [tmp_path / "ref.tif"])
    k = result["kappamask"]
    assert k["overall_accuracy"] == pytest.approx(3 / 6)
    assert k["classes"]["clear"]["recall"] == pytest.approx(0.5)
    table = format_table(result)
    assert "overall accuracy" in table and " 50.00" in table and "Confusion matrix" in table
    runner = CliRunner()
    done = runner.invoke(
        main,
        [
            "evaluate",
            "--pred",
            str(tmp_path / "pred.tif"),
            "--ref",
            str(tmp_path / "ref.tif"),
            "--json",
            str(tmp_path / "r.json"),
            "--png",
            str(tmp_path / "r.png"),
        ],
    )
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "r.json").read_text())["kappamask"]["pixels"] == 6
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _write_mask(tmp_path / "shifted.tif", ref, origin=(500060, 6000000))
    with pytest.raises(InvalidInputError, match="same grid"):
        evaluate([tmp_path / "pred.tif"], [tmp_path / "shifted.tif"])


def test_evaluate_with_the_sen2cor_column(tmp_path: Path) -> None:
    """The reference here is SCL itself, so the Sen2Cor column must agree perfectly."""
    from kappamask.geometry.grid import output_grid
    from kappamask.sources import open_safe
    from kappamask.tools.labels import read_scl_labels

    product = open_safe(T29UNU)
    grid = output_grid(product, 60)
    scl = read_scl_labels(product, grid)
    _write_labels(tmp_path / "ref.tif", grid, scl)
    result = evaluate([tmp_path / "ref.tif"], [tmp_path / "ref.tif"], scl_products=[T29UNU])
    assert result["sen2cor"]["overall_accuracy"] == 1.0
    assert result["sen2cor"]["confusion"] == result["kappamask"]["confusion"]


def test_evaluate_a_kappaset_folder_with_a_model(tmp_path: Path) -> None:
    """The served ONNX format on KappaSet-style sub-tiles: a model whose head prefers
    CLOUD everywhere scores exactly the cloud fraction of the labels."""
    torch = pytest.importorskip("torch")
    from kappamask.tools.export import export_onnx
    from kappamask.tools.unet import UNet

    rng = np.random.default_rng(2)
    folder = tmp_path / "kappaset"
    folder.mkdir()
    for i in range(2):
        _write_kappaset_tile(folder / f"tile_{i}.nc", L2A_FEATURES, rng)
    model = UNet(13, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.layer("head.conv2").bias.copy_(torch.tensor([0.0, -5, -5, -5, 5, -5]))
    onnx_path = export_onnx(model, "L2A", L2A_FEATURES, L2A_MAX_V, "t", tmp_path / "m.onnx")
    runner = CliRunner()
    done = runner.invoke(
        main,
        [
            "evaluate",
            "--kappaset",
            str(folder),
            "--model",
            str(onnx_path),
            "--json",
            str(tmp_path / "k.json"),
        ],
    )
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "k.json").read_text())["kappamask"]
    parts = []
    for path in sorted(folder.glob("*.nc")):
        with h5netcdf.File(path, "r") as nc:
            parts.append(np.asarray(nc.variables["Label"][...]).ravel())
    labels = np.concatenate(parts)
    scored = labels[(labels >= 1) & (labels <= 4)]
    assert result["pixels"] == scored.size
    assert result["overall_accuracy"] == pytest.approx((scored == 4).mean())
    assert result["classes"]["cloud"]["recall"] == pytest.approx(1.0)


def test_evaluate_with_the_s2cloudless_column(tmp_path: Path) -> None:
    """s2cloudless on the real, cloud-free L1C bands: it must call (almost) all of them
    clear, which it only does when it gets the right bands as reflectances."""
    from kappamask.geometry.grid import output_grid
    from kappamask.sources import open_safe

    safe = make_l1c_safe(tmp_path)
    grid = output_grid(open_safe(safe), 10)
    ref = np.full((grid.height, grid.width), MaskClass.CLEAR, np.uint8)
    _write_labels(tmp_path / "ref.tif", grid, ref)
    result = evaluate([tmp_path / "ref.tif"], [tmp_path / "ref.tif"], s2cloudless_products=[safe])
    clear = result["s2cloudless"]["two_class"]["classes"]["clear"]
    assert clear["recall"] > 0.9, result["s2cloudless"]["two_class"]
    with pytest.raises(ProductError, match="L1C products only"):
        evaluate([tmp_path / "ref.tif"], [tmp_path / "ref.tif"], s2cloudless_products=[T29UNU])


def test_composites_over_a_cloudy_product_keep_its_own_labels() -> None:
    """Over T29UNU (real clouds), composites are cut from mostly clear areas, and pixels
    that are not clear underneath keep SCL's label or are left out."""
    from kappamask.tools.datasets import CompositeSource
    from kappamask.tools.labels import read_scl_labels

    scene = Scene.load(T29UNU, L2A_FEATURES, L2A_MAX_V, 60)
    scl = read_scl_labels(scene.product, scene.grid)
    scl[~scene.valid] = MaskClass.MISSING
    source = CompositeSource(scene, 0.2, base_labels=scl, min_clear=0.5)
    rng = np.random.default_rng(0)
    for _ in range(3):
        feats, labels = source.train_crop(128, rng)
        assert feats.shape == (13, 128, 128)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 4, 5}


def test_side_by_side_on_a_real_l2a_product(tmp_path: Path) -> None:
    """`evaluate --side-by-side`: the mask here is SCL itself, so the Sen2Cor pair must
    agree perfectly; ukis-csmask is run on the same grid and must find T29UNU's clouds;
    the picture has the true colour and the three masks."""
    from kappamask.geometry.grid import output_grid
    from kappamask.sources import open_safe
    from kappamask.tools.labels import read_scl_labels

    product = open_safe(T29UNU)
    grid = output_grid(product, 60)
    scl = read_scl_labels(product, grid)
    scl[scl == MaskClass.UNDEFINED] = MaskClass.CLEAR  # a mask has no UNDEFINED
    _write_labels(tmp_path / "mask.tif", grid, scl)
    args = [
        "evaluate",
        "--side-by-side",
        str(T29UNU),
        str(tmp_path / "mask.tif"),
        "--json",
        str(tmp_path / "r.json"),
        "--png",
        str(tmp_path / "r.png"),
    ]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {
        "kappamask vs ukis-csmask",
        "kappamask vs sen2cor",
        "ukis-csmask vs sen2cor",
        "trust",
    }
    assert result["kappamask vs sen2cor"]["overall_accuracy"] == 1.0
    # the mask is SCL itself: SCL's cloud all found, its water all clear, three classes equal
    trust = result["trust"]
    assert trust["sen2cor"]["cloud_found"] == 1.0
    assert trust["sen2cor"]["three_class_agreement"] == 1.0
    assert trust["sen2cor_water"]["pixels"] > 1000 and trust["sen2cor_water"]["stay_clear"] == 1.0
    ukis = result["ukis-csmask vs sen2cor"]["two_class"]["classes"]["cloud"]
    assert ukis["dice"] > 0.7, ukis  # SCL and ukis-csmask agree on the thick clouds
    from PIL import Image

    with Image.open(tmp_path / "r.png") as png:
        assert png.size[0] > 3 * png.size[1]  # four panels in a row
