"""Analysis-ready outputs: cloud and shadow buffers, the cloud probability, the usable-pixel
mask, cover over the user's area, and results served over HTTP.

The buffers are checked against scipy's binary dilation with a disc (an independent
implementation of the same definition), on Sen2Cor's real scene classification of the
sample and on the model's real mask of it."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from scipy.ndimage import binary_dilation
from werkzeug.test import Client
from werkzeug.wrappers import Response

from kappamask.api.guard import RequestGuard
from kappamask.api.process import parse_inputs
from kappamask.assembly import postprocess
from kappamask.bands import SCL_TO_CLASS, MaskClass
from kappamask.cli import main
from kappamask.errors import InvalidInputError
from kappamask.geometry.grid import Grid, output_grid
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import run
from kappamask.sources import open_safe
from kappamask.writers.cog import StripWriter

from .conftest import T29UNU

CLEAR, SHADOW, SEMI, CLOUD, MISSING = (
    MaskClass.CLEAR,
    MaskClass.CLOUD_SHADOW,
    MaskClass.SEMI_TRANSPARENT_CLOUD,
    MaskClass.CLOUD,
    MaskClass.MISSING,
)


def _disc(radius: float) -> np.ndarray:
    r = int(np.floor(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(x * x + y * y <= radius * radius)


def _reference(classes: np.ndarray, cloud_px: float, shadow_px: float) -> np.ndarray:
    """The buffered class map by the definition, with scipy's binary dilation."""
    out = classes.copy()
    free = (classes == CLEAR) | (classes == SHADOW)
    if cloud_px > 0:
        near_cloud = binary_dilation(classes == CLOUD, _disc(cloud_px)) & free
        near_semi = binary_dilation(classes == SEMI, _disc(cloud_px)) & free
        out[near_semi] = SEMI
        out[near_cloud] = CLOUD
    if shadow_px > 0:
        out[binary_dilation(classes == SHADOW, _disc(shadow_px)) & (out == CLEAR)] = SHADOW
    return out


@pytest.fixture(scope="module")
def scl_classes() -> np.ndarray:
    """Sen2Cor's real scene classification of the sample at 60 m, as mask codes."""
    path = next(T29UNU.glob("GRANULE/*/IMG_DATA/R60m/*_SCL_60m.jp2"))
    with rasterio.open(path) as src:
        scl = src.read(1)
    lut = np.zeros(256, np.uint8)
    for code, cls in SCL_TO_CLASS.items():
        lut[code] = CLEAR if cls == MaskClass.UNDEFINED else cls
    classes = lut[scl]
    assert all((classes == c).any() for c in (CLEAR, SHADOW, SEMI, CLOUD, MISSING))
    return classes


# -- fast: no server ---------------------------------------------------------------------
@pytest.mark.parametrize(("cloud_px", "shadow_px"), [(5, 2), (2.5, 0), (0, 3.2), (16.7, 8)])
def test_buffers_are_a_disc_dilation(
    scl_classes: np.ndarray, cloud_px: float, shadow_px: float
) -> None:
    buffered = postprocess.apply_buffers(scl_classes, cloud_px, shadow_px)
    assert (buffered == _reference(scl_classes, cloud_px, shadow_px)).all()
    assert ((buffered == MISSING) == (scl_classes == MISSING)).all()  # never over MISSING
    cloudy = np.isin(scl_classes, (SEMI, CLOUD))
    assert np.isin(buffered[cloudy], (SEMI, CLOUD)).all()  # no cloud shrinks


def test_a_known_cloud_edge_grows_by_the_buffer(scl_classes: np.ndarray) -> None:
    """A lone cloud pixel in clear land becomes a disc: N px to each side, N/sqrt(2) on
    the diagonals."""
    classes = np.full((41, 41), CLEAR, np.uint8)
    classes[20, 20] = CLOUD
    buffered = postprocess.apply_buffers(classes, 6, 0)
    assert (buffered[20] == CLOUD).sum() == 13 and (buffered[:, 20] == CLOUD).sum() == 13
    assert buffered[20 + 4, 20 + 4] == CLOUD and buffered[20 + 5, 20 + 5] == CLEAR


def test_strips_leave_no_seams(
    scl_classes: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The strip-wise pass (37-row strips here, so many edges) equals a whole-raster one."""
    from affine import Affine

    height, width = scl_classes.shape
    grid = Grid("EPSG:32629", Affine(60, 0, 499980, 0, -60, 5900040), width, height)
    with StripWriter(tmp_path / "model.tif", grid) as out:
        out.write(0, scl_classes)
    monkeypatch.setattr(postprocess, "STRIP_ROWS", 37)
    with (
        StripWriter(tmp_path / "mask.tif", grid) as mask_out,
        StripWriter(tmp_path / "valid.tif", grid, nodata=255) as valid_out,
    ):
        counts = postprocess.finish_layers(
            tmp_path / "model.tif", grid, 7.5, 3, mask_out, valid_out
        )
    with rasterio.open(tmp_path / "mask.tif") as a, rasterio.open(tmp_path / "valid.tif") as v:
        mask, valid = a.read(1), v.read(1)
    expected = _reference(scl_classes, 7.5, 3)
    assert (mask == expected).all()
    assert (valid == np.where(expected == MISSING, 255, expected == CLEAR)).all()
    assert (counts.classes[:5] == np.bincount(expected.ravel(), minlength=5)).all()
    assert counts.area_pixels is None


@pytest.mark.parametrize("value", [-1, 1000.5, "100", True, None, [5]])
def test_buffer_inputs_outside_the_range_are_refused(value: object) -> None:
    with pytest.raises(InvalidInputError, match="must be a number of metres from 0 to 1000"):
        parse_inputs({"product": "x.SAFE", "shadow_buffer": value})
    options = parse_inputs({"product": "x.SAFE", "cloud_buffer": 250, "shadow_buffer": 0.5})[2]
    assert (options.cloud_buffer, options.shadow_buffer) == (250.0, 0.5)


def test_the_cli_refuses_a_negative_buffer() -> None:
    done = CliRunner().invoke(main, ["run", str(T29UNU), "--out", "x", "--cloud-buffer", "-5"])
    assert done.exit_code == 2 and "0<=x<=1000" in done.output.replace(" ", "")


@pytest.fixture
def outputs_app(tmp_path: Path) -> Iterator[tuple[Client, Path]]:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a_KAPPAMASK.tif").write_bytes(bytes(range(256)) * 4)
    (tmp_path / ".jobs").mkdir()
    (tmp_path / ".jobs" / "jobs.tinydb").write_text("{}")
    (tmp_path / "run" / ".kappamask-staging-1@h.x").mkdir()
    (tmp_path / "run" / ".kappamask-staging-1@h.x" / "b.tif").write_bytes(b"half")

    def pygeoapi(_environ: object, start_response: object) -> list[bytes]:
        return Response("pygeoapi")(_environ, start_response)  # type: ignore[arg-type]

    guard = RequestGuard(pygeoapi, lambda: True, outputs=tmp_path)
    yield Client(guard), tmp_path


def test_the_output_folder_is_served_read_only_with_ranges(
    outputs_app: tuple[Client, Path],
) -> None:
    client, root = outputs_app
    with client.get("/outputs/run/a_KAPPAMASK.tif") as whole:
        assert whole.status_code == 200
        assert whole.data == (root / "run/a_KAPPAMASK.tif").read_bytes()
        assert whole.headers["Content-Type"].startswith("image/tiff")
        assert whole.headers["Accept-Ranges"] == "bytes"
    with client.get("/outputs/run/a_KAPPAMASK.tif", headers={"Range": "bytes=16-31"}) as part:
        assert part.status_code == 206 and part.data == bytes(range(16, 32))
    with client.head("/outputs/run/a_KAPPAMASK.tif") as head:
        assert head.headers["Content-Length"] == "1024" and head.data == b""
    for hidden in (
        "/outputs/.jobs/jobs.tinydb",
        "/outputs/run/.kappamask-staging-1@h.x/b.tif",
        "/outputs/../outputs/run/a_KAPPAMASK.tif",
        "/outputs/run/nothing.tif",
        "/outputs/run",
        "/outputs/%2e%2e/etc/passwd",
    ):
        answer = client.get(hidden)
        assert answer.status_code == 404, hidden
        assert answer.json["code"] == "NotFound"
    assert client.post("/outputs/run/a_KAPPAMASK.tif", json={}).status_code == 405
    assert client.get("/processes").data == b"pygeoapi"  # everything else: pygeoapi's


# -- through a real Triton -----------------------------------------------------------------
@pytest.fixture(scope="module")
def client(triton: LocalTriton) -> Iterator[TritonClient]:
    with TritonClient(triton.http_url) as c:
        yield c


def _read(path: str) -> np.ndarray:
    with rasterio.open(path) as src:
        return np.asarray(src.read(1))


@pytest.mark.slow
def test_buffers_probability_and_valid_on_the_real_sample(
    client: TritonClient, tmp_path: Path
) -> None:
    plain = run(str(T29UNU), tmp_path / "plain", client, RunOptions(60))
    options = RunOptions(60, cloud_buffer=300, shadow_buffer=120)
    buffered = run(str(T29UNU), tmp_path / "buffered", client, options)
    classes, grown = _read(plain.mask), _read(buffered.mask)
    # 300 m and 120 m at 60 m: 5 and 2 pixels
    assert (grown == _reference(classes, 5, 2)).all()
    assert (grown != classes).mean() > 0.01  # the sample has cloud edges to grow
    # the probability is the model's, buffers or not; above 50 exactly on its cloud
    probability = _read(plain.probability)
    assert (_read(buffered.probability) == probability).all()
    data = classes != MISSING
    assert (probability[~data] == 255).all()
    assert (probability[np.isin(classes, (SEMI, CLOUD))] >= 50).all()
    assert (probability[np.isin(classes, (CLEAR, SHADOW))] <= 50).all()
    assert probability[classes == CLOUD].mean() > probability[classes == CLEAR].mean() + 40
    # the usable-pixel mask is the buffered map's clear pixels
    valid = _read(buffered.valid)
    assert (valid == np.where(grown == MISSING, 255, grown == CLEAR)).all()
    assert (valid == 1).sum() < (_read(plain.valid) == 1).sum()
    item = json.loads(Path(buffered.item).read_text())
    assert item["properties"]["kappamask:parameters"]["cloud_buffer"] == 300.0
    counts = np.bincount(grown[grown != MISSING], minlength=5)
    assert buffered.statistics["cloud_cover"] == pytest.approx(
        100 * (counts[SEMI] + counts[CLOUD]) / counts.sum(), abs=1e-3
    )
    _check_preview(buffered.preview, buffered.mask)
    assert run(str(T29UNU), tmp_path / "buffered", client, options).reused
    # the buffers are part of what makes a result the same
    other = RunOptions(60, cloud_buffer=60)
    assert not run(str(T29UNU), tmp_path / "buffered", client, other).reused


def _check_preview(preview: str, mask: str) -> None:
    """Clear pixels of the preview away from class edges show the product's own colours:
    red from B04 as reflectance x 2.5, read here straight from the band file."""
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a picture, not a map
        with rasterio.open(preview) as png:
            image = png.read()
    shape = image.shape[1:]
    with rasterio.open(mask) as src:
        classes = src.read(1, out_shape=shape, resampling=Resampling.mode)
    b04 = next(T29UNU.glob("GRANULE/*/IMG_DATA/R60m/*_B04_60m.jp2"))
    with rasterio.open(b04) as src:
        dn = src.read(1, out_shape=shape, resampling=Resampling.average).astype(np.float64)
    red = np.clip((dn - 1000) / 10000 * 2.5 * 255, 0, 255)  # baseline 04.00: offset -1000
    interior = binary_dilation(classes != CLEAR, np.ones((3, 3))) == 0
    assert interior.sum() > 500
    assert np.abs(image[0][interior] - red[interior]).max() <= 1.5
    assert (image[3][classes == MISSING] == 0).all() and (image[3][classes != MISSING] == 255).all()
    # clouds are tinted, not shown as the image: amber over the white cloud tops
    cloud = classes == CLOUD
    assert image[2][cloud].mean() < image[0][cloud].mean() - 40


@pytest.mark.slow
def test_cover_is_over_the_aoi(client: TritonClient, tmp_path: Path) -> None:
    """A triangle over the sample: the figures are counted over its pixels, as a user
    would count them from the COG."""
    grid = output_grid(open_safe(T29UNU), 60)
    left, bottom, right, top = grid.bounds
    ring = [
        (left + 3000, top - 3000),
        (right - 9000, top - 6000),
        (left + 6000, bottom + 4000),
        (left + 3000, top - 3000),
    ]
    aoi = transform_geom(grid.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    result = run(str(T29UNU), tmp_path, client, RunOptions(60, aoi=dict(aoi)))
    with rasterio.open(result.mask) as src:
        classes = src.read(1)
        local = transform_geom("EPSG:4326", src.crs, aoi)
        inside = rasterize(
            [local], out_shape=classes.shape, transform=src.transform, all_touched=True
        ).astype(bool)
    assert not (classes[~inside] != MISSING).any()  # outside the triangle: missing
    counts = np.bincount(classes[inside], minlength=5)
    data = counts[1:].sum()
    figures = result.to_json()
    assert figures["cloud_cover"] == pytest.approx(
        100 * (counts[SEMI] + counts[CLOUD]) / data, abs=1e-3
    )
    assert figures["class_percentages"]["clear"] == pytest.approx(
        100 * counts[CLEAR] / data, abs=1e-3
    )
    # missing: of the triangle's pixels, not of its bounding box's
    assert figures["missing_percentage"] == pytest.approx(
        100 * counts[MISSING] / inside.sum(), abs=0.05
    )
    assert figures["missing_percentage"] < 100 * (classes == MISSING).mean() - 10
