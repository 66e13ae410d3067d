"""STAC items as product references: the three real items of tests/data/stac, and items
rewritten to point at the fixture's band files on disk and on a real S3 server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from kappamask.access import AccessPolicy
from kappamask.bands import L1C_FEATURES, L1C_MAX_V, STAC_BAND_ALIASES
from kappamask.errors import AccessDeniedError, InvalidInputError, ProductError
from kappamask.geometry.grid import output_grid
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import run
from kappamask.reading.reader import BandReader
from kappamask.sources import open_product
from kappamask.sources.stac import fetch_item
from kappamask.storage.sinks import OutputTarget

from .conftest import DATA, STAC, T29UNU, S3Server
from .stac_api import s2_item

EARTH_SEARCH_V1_L1C = STAC / "earth-search-v1_S2B_27VWK_20240206_0_L1C.json"
EARTH_SEARCH_V0_L2A = STAC / "earth-search-v0_S2A_28QCH_20200714_0_L2A.json"
PLANETARY_COMPUTER_L2A = STAC / "planetary-computer_S2B_MSIL2A_20190629T212529_R043_T06VVN.json"
T29UNU_R60 = next(T29UNU.glob("GRANULE/*/IMG_DATA/R60m"))
OPEN = AccessPolicy()  # no restriction: parsing only


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_earth_search_v1_l1c_by_common_names_with_raster_offsets() -> None:
    product = open_product(_load(EARTH_SEARCH_V1_L1C), OPEN)
    assert product.level == "L1C" and product.processing_baseline == "05.10"
    assert product.product_id == "S2B_MSIL1C_20240206T131259_N0510_R081_T27VWK_20240206T133903"
    assert product.mgrs_tile == "27VWK" and product.crs == "EPSG:32627"
    assert sorted(product.band_files) == sorted(L1C_FEATURES)
    # rededge1..3, nir08, cirrus found by key; JP2 on s3:// read through /vsis3/
    assert product.band_files["B05"] == {
        20: "/vsis3/sentinel-s2-l1c/tiles/27/V/WK/2024/2/6/0/B05.jp2"
    }
    assert product.band_files["B8A"] == {
        20: "/vsis3/sentinel-s2-l1c/tiles/27/V/WK/2024/2/6/0/B8A.jp2"
    }
    assert product.band_files["B10"] == {
        60: "/vsis3/sentinel-s2-l1c/tiles/27/V/WK/2024/2/6/0/B10.jp2"
    }
    # raster:bands offset -0.1 at scale 0.0001 is -1000 DN on the 10000 scale
    assert product.offsets == {band: pytest.approx(-1000.0) for band in L1C_FEATURES}
    assert product.gains == {}
    assert product.sun_zenith == pytest.approx(90 - 11.604167707198599)


def test_earth_search_v0_l2a_cogs_and_baseline_from_the_product_id() -> None:
    product = open_product(_load(EARTH_SEARCH_V0_L2A), OPEN)
    assert product.level == "L2A" and product.processing_baseline == "02.14"
    assert product.mgrs_tile == "28QCH" and product.crs == "EPSG:32628"
    assert product.offsets == {}  # baseline 02.14: no offset
    assert product.band_files["B02"][10].startswith("/vsicurl/https://sentinel-cogs.s3.")
    assert set(product.band_files["B01"]) == {60}
    assert {"AOT", "WVP", "SCL", "B8A", "B12"} <= set(product.band_files)


def test_planetary_computer_l2a_and_the_baseline_rule() -> None:
    item = _load(PLANETARY_COMPUTER_L2A)
    product = open_product(item, OPEN)
    assert product.level == "L2A" and product.processing_baseline == "02.12"
    assert product.mgrs_tile == "06VVN" and product.offsets == {}
    # key B8A wins over its eo:bands common name ("rededge" in this item)
    assert set(product.band_files["B8A"]) == {20}
    assert set(product.band_files["AOT"]) == {10}
    item["properties"]["s2:processing_baseline"] = "04.00"  # no raster:bands: ESA's rule
    assert set(open_product(item, OPEN).offsets.values()) == {-1000.0}


def test_not_sentinel2_or_not_an_item_is_refused() -> None:
    item = _load(PLANETARY_COMPUTER_L2A)
    item["properties"] = {"platform": "landsat-8", "datetime": item["properties"]["datetime"]}
    with pytest.raises(ProductError, match="does not describe a Sentinel-2"):
        open_product(item, OPEN)
    with pytest.raises(InvalidInputError, match="not a STAC item"):
        open_product({"type": "FeatureCollection", "features": []}, OPEN)


def test_raster_offsets_reach_the_features(tmp_path: Path) -> None:
    """Earth Search v1 L1C item pointed at real L1C band files: features = (DN - 1000) /
    65535 / max_v, so the item's raster:bands offset is applied exactly once."""
    item = _load(EARTH_SEARCH_V1_L1C)
    for key, asset in item["assets"].items():
        if key in STAC_BAND_ALIASES:
            asset["href"] = str(DATA / "s2" / "l1c_bands" / f"{STAC_BAND_ALIASES[key]}.jp2")
    product = open_product(item, AccessPolicy(data_roots=(DATA,)))
    grid = output_grid(product, 60)
    with BandReader(product, L1C_FEATURES, L1C_MAX_V, grid, "bilinear") as reader:
        features, valid = reader.read(Window(0, 0, grid.width, grid.height))
    with rasterio.open(DATA / "s2" / "l1c_bands" / "B09.jp2") as src:
        raw = src.read(1).astype(np.float64)
    i = L1C_FEATURES.index("B09")
    expected = np.maximum((raw - 1000) / 65535 / L1C_MAX_V[i], 0)
    assert valid.all()
    np.testing.assert_allclose(features[i], expected[: grid.height, : grid.width], atol=1e-6)


@pytest.fixture(scope="module")
def safe_mask(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    with TritonClient(triton.http_url) as client:
        result = run(str(T29UNU), tmp_path_factory.mktemp("safe"), client, RunOptions(60))
    with rasterio.open(result.mask) as src:
        return src.read(1)


def _mask_of(result_mask: str, s3: S3Server | None = None) -> np.ndarray:
    env = s3.settings.rasterio_env() if s3 else {}
    path = result_mask.replace("s3://", "/vsis3/")
    with rasterio.Env(**env), rasterio.open(path) as src:
        return src.read(1)


def test_local_stac_item_gives_the_same_mask_as_the_safe(
    triton: LocalTriton, tmp_path: Path, safe_mask: np.ndarray
) -> None:
    item = s2_item(T29UNU)  # no raster:bands: the baseline rule must match the SAFE's offsets
    item_file = tmp_path / "item.json"
    item_file.write_text(json.dumps(item))
    with TritonClient(triton.http_url) as client:
        target = OutputTarget(tmp_path / "out", AccessPolicy(data_roots=(DATA, tmp_path)))
        result = run(str(item_file), target, client, RunOptions(60))
    assert result.product_id == T29UNU.name.removesuffix(".SAFE")
    assert (_mask_of(result.mask) == safe_mask).all()
    written = json.loads(Path(result.item).read_text())
    assert written["links"][0]["rel"] == "derived_from"
    # an asset outside the data roots is refused like a product path
    with TritonClient(triton.http_url) as client, pytest.raises(AccessDeniedError):
        target = OutputTarget(tmp_path / "out2", AccessPolicy(data_roots=(tmp_path,)))
        run(item, target, client, RunOptions(60))
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_stac_item_on_s3_with_s3_assets(
    triton: LocalTriton, s3_server: S3Server, tmp_path: Path, safe_mask: np.ndarray
) -> None:
    prefix = f"s2/{T29UNU.name}/{T29UNU_R60.relative_to(T29UNU).as_posix()}"
    item = s2_item(T29UNU, href_of=lambda path: f"s3://products/{prefix}/{path.name}")
    s3_server.client().put_object(
        Bucket="products", Key="items/t29unu.json", Body=json.dumps(item).encode()
    )
    policy = AccessPolicy(s3=s3_server.settings)
    with TritonClient(triton.http_url) as client:
        result = run(
            "s3://products/items/t29unu.json",
            OutputTarget("s3://results/stac-run", policy),
            client,
            RunOptions(60),
        )
    assert result.mask.startswith("s3://results/stac-run/")
    assert (_mask_of(result.mask, s3_server) == safe_mask).all()


class _Handler(BaseHTTPRequestHandler):
    item: bytes = b""

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.invalid/item.json")
            self.end_headers()
            return
        if self.path != "/item.json":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/geo+json")
        self.end_headers()
        self.wfile.write(self.item)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def http_item() -> Iterator[str]:
    _Handler.item = json.dumps(s2_item(T29UNU)).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_stac_item_over_http_and_the_url_policy(http_item: str) -> None:
    allowed = AccessPolicy(data_roots=(DATA,), allowed_hosts=("127.0.0.1",))
    item = fetch_item(f"{http_item}/item.json", allowed)
    assert item.properties["s2:product_uri"] == T29UNU.name
    assert open_product(f"{http_item}/item.json", allowed).level == "L2A"
    with pytest.raises(AccessDeniedError, match="loopback or private"):
        fetch_item(
            f"{http_item}/item.json",
            AccessPolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=False),
        )
    with pytest.raises(AccessDeniedError, match="not among the hosts"):
        fetch_item(f"{http_item}/item.json", AccessPolicy(allowed_hosts=("example.com",)))
    # a redirect to a host that is not allowed is refused before it is followed
    with pytest.raises(AccessDeniedError, match=r"elsewhere\.invalid"):
        fetch_item(f"{http_item}/redirect", allowed)
    with pytest.raises(InvalidInputError, match="file://"):
        open_product("file:///etc/passwd", allowed)
