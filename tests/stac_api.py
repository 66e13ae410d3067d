"""A real STAC API for the tests: stac-fastapi-pgstac (Transactions on) over pgstac in a
PostgreSQL + PostGIS cluster of the Debian packages, as catalogs on DIAS run it, holding
STAC items of the real Sentinel-2 products under tests/data."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
import requests
from rasterio.warp import transform_bounds

from kappamask.inference.server import free_port
from kappamask.sources import open_safe

from .conftest import STAC
from .postgres import postgis_cluster

S2_COLLECTION = "sentinel-2-l2a"
OTHER_COLLECTION = "landsat-c2-l2"
_TEMPLATE = STAC / "planetary-computer_S2B_MSIL2A_20190629T212529_R043_T06VVN.json"
_NAME = re.compile(r"(S2[ABC])_MSIL2A_(\d{8}T\d{6})_N(\d{2})(\d{2})_R\d{3}_T(\d{2}[A-Z]{3})_")


def s2_item(
    safe: Path,
    collection: str = S2_COLLECTION,
    cloud_cover: float = 10.0,
    href_of: Callable[[Path], str] = str,
) -> dict[str, Any]:
    """A Planetary-Computer-style STAC item of a SAFE product under tests/data: its 60 m
    band files as assets (at ``href_of(file)``), footprint and CRS from the files, ids and
    dates from the name. Like Planetary Computer's items it has no raster:bands: readers
    must apply ESA's baseline rule for the offsets."""
    match = _NAME.search(safe.name)
    assert match, safe.name
    platform, when, major, minor, tile = match.groups()
    r60 = next(safe.glob("GRANULE/*/IMG_DATA/R60m"))
    item = copy.deepcopy(json.loads(_TEMPLATE.read_text()))
    with rasterio.open(next(r60.glob("*_B04_60m.jp2"))) as src:
        epsg = src.crs.to_epsg()
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    item.update(
        id=safe.name.removesuffix(".SAFE").removeprefix("esa_"),
        collection=collection,
        bbox=[west, south, east, north],
        geometry={"type": "Polygon", "coordinates": [ring]},
        links=[],
    )
    product_uri = safe.name.removeprefix("esa_")
    day, clock = when[:8], when[9:15]
    item["properties"].update(
        {
            "datetime": f"{day[:4]}-{day[4:6]}-{day[6:]}T{clock[:2]}:{clock[2:4]}:{clock[4:]}Z",
            "platform": f"Sentinel-{platform[1:]}",
            "s2:product_uri": product_uri,
            "s2:processing_baseline": f"{major}.{minor}",
            "s2:mgrs_tile": tile,
            "proj:epsg": epsg,
            "eo:cloud_cover": cloud_cover,
        }
    )
    # the product's own sun (the template's are another tile's): the shadow check reads them
    sun = open_safe(safe).sun
    assert sun is not None, safe.name
    item["properties"].update(
        {"s2:mean_solar_azimuth": sun.azimuth, "s2:mean_solar_zenith": sun.zenith}
    )
    for key in list(item["assets"]):
        files = list(r60.glob(f"*_{key}_60m.jp2"))
        if files:
            item["assets"][key]["href"] = href_of(files[0])
            item["assets"][key]["gsd"] = 60
        else:
            del item["assets"][key]  # only the bands of this product's 60 m folder
    return item


def landsat_item(like: dict[str, Any]) -> dict[str, Any]:
    """An item that is not Sentinel-2 over the same place (for a search that must refuse it)."""
    item = copy.deepcopy(like)
    item.update(id="LC08_L2SP_204023_20221005_02_T1", collection=OTHER_COLLECTION)
    item["properties"] = {
        "datetime": like["properties"]["datetime"],
        "platform": "landsat-8",
        "eo:cloud_cover": 5.0,
    }
    item["assets"] = {}
    return item


def collection_of(collection_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    bbox = [
        min(i["bbox"][0] for i in items),
        min(i["bbox"][1] for i in items),
        max(i["bbox"][2] for i in items),
        max(i["bbox"][3] for i in items),
    ]
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": collection_id,
        "description": f"{collection_id} (test)",
        "license": "proprietary",
        "links": [],
        "extent": {
            "spatial": {"bbox": [bbox]},
            "temporal": {"interval": [["2015-06-23T00:00:00Z", None]]},
        },
    }


@dataclass
class StacApi:
    url: str

    def add(self, collection: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Create a collection and its items through the Transactions extension."""
        response = requests.post(f"{self.url}/collections", json=collection, timeout=30)
        assert response.status_code in (200, 201), response.text
        for item in items:
            response = requests.post(
                f"{self.url}/collections/{collection['id']}/items", json=item, timeout=30
            )
            assert response.status_code in (200, 201), response.text

    def items(self, collection_id: str) -> list[dict[str, Any]]:
        response = requests.get(
            f"{self.url}/collections/{collection_id}/items", params={"limit": 100}, timeout=30
        )
        assert response.status_code == 200, response.text
        return list(response.json()["features"])


@contextmanager
def stac_fastapi_pgstac(base: Path) -> Iterator[StacApi]:
    """pgstac migrated into a fresh cluster and stac-fastapi-pgstac serving it."""
    with postgis_cluster() as dsn:
        pypgstac = Path(sys.executable).parent / "pypgstac"
        subprocess.run(
            [str(pypgstac), "migrate", "--dsn", dsn], check=True, capture_output=True, timeout=300
        )
        port = free_port()
        host_port = dsn.split("@", 1)[1].split("/", 1)[0]
        env = {
            **os.environ,
            "PGUSER": "postgres",
            "PGPASSWORD": "unused",
            "PGHOST": host_port.split(":")[0],
            "PGPORT": host_port.split(":")[1],
            "PGDATABASE": "postgres",
            "ENABLE_TRANSACTIONS_EXTENSIONS": "true",
        }
        log = (base / "stac-api.log").open("w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "stac_fastapi.pgstac.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (base / "stac-api.log").read_text()
                assert time.monotonic() < deadline, (base / "stac-api.log").read_text()
                try:
                    if requests.get(f"{url}/conformance", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.3)
            yield StacApi(url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
