"""Batches over a real STAC API (stac-fastapi-pgstac on PostgreSQL + PostGIS): the
search that picks the products, and the Transactions that publish their masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pystac_client
import pytest

from kappamask.access import AccessPolicy
from kappamask.errors import AccessDeniedError, InvalidInputError, ProductError, StorageError
from kappamask.inference.server import LocalTriton, free_port
from kappamask.sources import open_product
from kappamask.sources.search import search_items
from kappamask.writers.stac_api import absolute, check_api, for_api

from .conftest import DATA, T22HBD, T29UNU
from .stac_api import OTHER_COLLECTION, S2_COLLECTION, StacApi

LOCAL = AccessPolicy(data_roots=(DATA,), allowed_hosts=("127.0.0.1",))
T29UNU_ID = T29UNU.stem
T22HBD_ID = T22HBD.stem.removeprefix("esa_")


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return sorted(str(item["id"]) for item in items)


def test_a_search_finds_the_sentinel2_items_it_names(stac_api: StacApi) -> None:
    url = stac_api.url
    everything = search_items({"url": url, "collections": [S2_COLLECTION]}, LOCAL, 500)
    assert _ids(everything) == sorted([T29UNU_ID, T22HBD_ID])
    t29unu = next(item for item in everything if item["id"] == T29UNU_ID)
    west, south = t29unu["bbox"][:2]
    inside = [west + 0.1, south + 0.1, west + 0.2, south + 0.2]
    assert _ids(
        search_items({"url": url, "collections": S2_COLLECTION, "bbox": inside}, LOCAL, 500)
    ) == [T29UNU_ID]
    in_2021 = {"url": url, "collections": [S2_COLLECTION], "datetime": "2021-01-01/2021-12-31"}
    assert _ids(search_items(in_2021, LOCAL, 500)) == [T22HBD_ID]
    clear = {"url": url, "collections": [S2_COLLECTION], "query": {"eo:cloud_cover": {"lt": 20}}}
    assert _ids(search_items(clear, LOCAL, 500)) == [T29UNU_ID]
    # what a search finds is what the pipeline opens
    assert open_product(t29unu, LOCAL).product_id == T29UNU_ID


def test_a_search_that_cannot_make_a_batch_is_refused(stac_api: StacApi) -> None:
    url = stac_api.url
    with pytest.raises(InvalidInputError, match="more than 1 items"):
        search_items({"url": url, "collections": [S2_COLLECTION], "max_items": 1}, LOCAL, 500)
    with pytest.raises(InvalidInputError, match="matched no items"):
        search_items(
            {"url": url, "collections": [S2_COLLECTION], "datetime": "2030-01-01/.."}, LOCAL, 500
        )
    with pytest.raises(ProductError, match=r"not Sentinel-2 .*LC08"):
        search_items({"url": url, "collections": [OTHER_COLLECTION]}, LOCAL, 500)
    with pytest.raises(ProductError, match=r"1 item.* not Sentinel-2"):  # all collections
        search_items({"url": url}, LOCAL, 500)
    with pytest.raises(InvalidInputError, match="max_items"):
        search_items({"url": url, "max_items": 501}, LOCAL, 500)
    with pytest.raises(InvalidInputError, match=r"unknown key.*cloud"):
        search_items({"url": url, "cloud": 10}, LOCAL, 500)
    with pytest.raises(StorageError, match="cannot be reached"):
        search_items({"url": f"http://127.0.0.1:{free_port()}"}, LOCAL, 500)
    with pytest.raises(AccessDeniedError, match="loopback or private"):
        search_items({"url": url}, AccessPolicy(allow_private_networks=False), 500)


def test_the_api_must_offer_transactions(stac_api: StacApi) -> None:
    assert check_api(stac_api.url + "/", LOCAL) == stac_api.url
    with pytest.raises(InvalidInputError, match="not a STAC API"):
        check_api(f"{stac_api.url}/collections/{S2_COLLECTION}", LOCAL)
    with pytest.raises(StorageError, match="cannot be reached"):
        check_api(f"http://127.0.0.1:{free_port()}", LOCAL)


def test_published_documents_lose_static_links_and_keep_absolute_hrefs() -> None:
    item = {
        "id": "a",
        "links": [
            {"rel": "self", "href": "./a.json"},
            {"rel": "derived_from", "href": "https://x/y.json"},
        ],
        "assets": {"mask": {"href": "./a.tif"}, "s3": {"href": "s3://b/k.tif"}},
    }
    out = for_api(item, "/data/out/a.json")
    assert [link["rel"] for link in out["links"]] == ["derived_from"]
    assert out["assets"]["mask"]["href"] == "/data/out/a.tif"
    assert out["assets"]["s3"]["href"] == "s3://b/k.tif" and item["links"][0]["rel"] == "self"
    assert absolute("a.tif", "https://h/outputs/x/a.json") == "https://h/outputs/x/a.tif"


def _batch(args: list[str], triton: LocalTriton) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kappamask.cli", "batch", *args, "--triton-url", triton.http_url],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ},
    )


def test_a_searched_batch_publishes_its_masks_to_the_stac_api(
    stac_api: StacApi, triton: LocalTriton, tmp_path: Path
) -> None:
    search = {"url": stac_api.url, "collections": [S2_COLLECTION], "max_items": 10}
    out = tmp_path / "masks"
    args = [
        "--search",
        json.dumps(search),
        "--stac-api",
        stac_api.url,
        "--out",
        str(out),
        "--resolution",
        "60",
        "--collection-id",
        "masks-cli",
    ]
    done = _batch(args, triton)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(2 items published)" in done.stdout, done.stdout
    published = stac_api.items("masks-cli")
    assert sorted(i["properties"]["kappamask:product_id"] for i in published) == sorted(
        [T29UNU_ID, T22HBD_ID]
    )
    for item in published:  # hrefs a client of the API can open
        assert Path(item["assets"]["mask"]["href"]).is_file(), item["assets"]["mask"]
    # what a user of the catalog does: search the masks
    client = pystac_client.Client.open(stac_api.url)
    cloudy = client.search(collections=["masks-cli"], datetime="2021-01-01/2021-12-31")
    assert [i.properties["kappamask:product_id"] for i in cloudy.items()] == [T22HBD_ID]
    again = _batch(args, triton)  # the same batch again: reused, replaced in the API (PUT)
    assert again.returncode == 0 and "already there" in again.stdout, again.stdout + again.stderr
    assert len(stac_api.items("masks-cli")) == 2
    refused = _batch([*args[:2], "--stac-api", f"{stac_api.url}/collections", *args[4:]], triton)
    assert refused.returncode != 0 and "not a STAC API" in refused.stderr, refused.stderr
