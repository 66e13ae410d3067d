"""Batches: many real products into one output, a STAC Collection over the results, one
bad product never failing the others."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pystac
import pytest
from pystac.validation import JsonSchemaSTACValidator

from kappamask.errors import CancelledError, InvalidInputError
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.jobs.batch import MAX_PRODUCTS, check_batch, run_batch
from kappamask.options import RunOptions
from kappamask.writers.stac_collection import COLLECTION_FILE, create_collection, link_item

from .conftest import DATA, T22HBD, T29UNU, validate_item


def _item(item_id: str, bbox: list[float], when: str, cloud: float) -> dict[str, Any]:
    west, south, east, north = bbox
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": item_id,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": bbox,
        "properties": {
            "datetime": when,
            "platform": "sentinel-2a",
            "eo:cloud_cover": cloud,
            "proj:code": "EPSG:32629",
            "kappamask:model": {"name": "kappamask_l2a", "version": "v2"},
        },
        "links": [{"rel": "self", "href": f"http://example.org/{item_id}.json"}],
        "assets": {},
    }


def test_the_collection_spans_its_items_and_links_them_relatively() -> None:
    items = [
        _item("a", [-9.0, 52.0, -8.0, 53.0], "2022-10-05T11:54:11Z", 12.5),
        _item("b", [-8.5, 51.5, -7.0, 52.5], "2022-06-01T11:54:11Z", 80.0),
    ]
    collection = create_collection("season", "two products", items, ["./a.json", "./b.json"])
    pystac.validation.validate_dict(collection)
    assert collection["extent"]["spatial"]["bbox"] == [[-9.0, 51.5, -7.0, 53.0]]
    assert collection["extent"]["temporal"]["interval"] == [
        ["2022-06-01T11:54:11Z", "2022-10-05T11:54:11Z"]
    ]
    assert collection["summaries"]["eo:cloud_cover"] == {"minimum": 12.5, "maximum": 80.0}
    assert collection["summaries"]["kappamask:model"] == ["kappamask_l2a v2"]
    assert [link["href"] for link in collection["links"] if link["rel"] == "item"] == [
        "./a.json",
        "./b.json",
    ]
    linked = link_item(items[0], "season")
    assert linked["collection"] == "season" and "collection" not in items[0]  # a copy
    rels = {link["rel"]: link["href"] for link in linked["links"]}
    assert rels["collection"] == rels["root"] == rels["parent"] == f"./{COLLECTION_FILE}"
    assert link_item(linked, "season") == linked  # linking again changes nothing
    pystac.validation.validate_dict(create_collection("season", "nothing yet", [], []))
    pystac.validation.validate_dict(linked)


def test_a_batch_is_checked_before_it_starts() -> None:
    with pytest.raises(InvalidInputError, match="at least one product"):
        check_batch([], "c")
    with pytest.raises(InvalidInputError, match=f"at most {MAX_PRODUCTS}"):
        check_batch(["p"] * (MAX_PRODUCTS + 1), "c")
    for bad in ("my collection/1", "..", "../items", ".hidden", ""):
        with pytest.raises(InvalidInputError, match="collection id"):
            check_batch(["p"], bad)
    check_batch(["p"], "sentinel-2_masks.v1")


@pytest.fixture
def client(triton: LocalTriton) -> Iterator[TritonClient]:
    with TritonClient(triton.http_url) as c:
        yield c


def _open_collection(folder: Path, validator: JsonSchemaSTACValidator) -> list[pystac.Item]:
    """What a user does: pystac opens the collection and follows its item links."""
    collection = pystac.Collection.from_file(str(folder / COLLECTION_FILE))
    collection.validate()
    items = list(collection.get_items())
    for item in items:
        # the file as written (pystac migrates extensions it reads to newer versions)
        href = item.get_self_href() or ""
        validate_item(json.loads(Path(href).read_text()), validator, href)
        assert item.collection_id == collection.id
    return items


@pytest.mark.slow
def test_one_bad_product_never_fails_the_batch_and_a_rerun_computes_nothing(
    client: TritonClient, tmp_path: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    missing = str(DATA / "s2" / "S2A_MSIL2A_20991231T000000_N0500_R001_T01AAA_X.SAFE")
    products = [str(T29UNU), missing, str(T22HBD), str(T29UNU)]
    seen: list[int] = []
    result = run_batch(
        products,
        tmp_path,
        client,
        RunOptions(resolution=60),
        collection_id="test-season",
        progress=lambda p, _m: seen.append(p),
    )
    status = [p.status for p in result.products]
    assert status == ["successful", "failed", "successful", "successful"]
    assert "T01AAA" in (result.products[1].message or "")
    assert all(isinstance(p.cloud_cover, float) for p in result.products if p.product_id)
    assert result.products[3].reused  # the same product twice: computed once
    assert seen == sorted(seen) and seen[-1] == 100
    items = _open_collection(tmp_path, stac_validator)
    product_ids = sorted(i.properties["kappamask:product_id"] for i in items)
    assert product_ids == sorted({p.product_id for p in result.products} - {None})
    collection = json.loads((tmp_path / COLLECTION_FILE).read_text())
    assert collection["id"] == "test-season" and len(collection["summaries"]["proj:code"]) == 2
    assert result.to_json()["failed"] == 1 and result.collection.endswith(COLLECTION_FILE)

    again = run_batch(
        products[:1] + products[2:3],
        tmp_path,
        client,
        RunOptions(resolution=60),
        collection_id="test-season",
    )
    assert [p.reused for p in again.products] == [True, True]


@pytest.mark.slow
def test_a_cancelled_batch_leaves_a_valid_collection_of_what_it_finished(
    client: TritonClient, tmp_path: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    done: list[str] = []

    def cancelled() -> bool:  # cancel once the first product's item is in the collection
        return len(done) > 0

    def progress(percent: int, message: str) -> None:
        if percent >= 50 and not done:
            done.append(message)

    with pytest.raises(CancelledError):
        run_batch(
            [str(T29UNU), str(T22HBD)],
            tmp_path,
            client,
            RunOptions(resolution=60),
            progress=progress,
            cancelled=cancelled,
        )
    items = _open_collection(tmp_path, stac_validator)
    assert [i.properties["kappamask:product_id"] for i in items] == [T29UNU.stem]
    assert not [p for p in tmp_path.iterdir() if "T22HBD" in p.name]  # nothing half-written


@pytest.mark.slow
def test_the_batch_command(triton: LocalTriton, tmp_path: Path) -> None:
    listing = tmp_path / "products.txt"
    listing.write_text(f"# two products, one of them missing\n{T29UNU}\n{tmp_path / 'nope.SAFE'}\n")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kappamask.cli",
            "batch",
            "--products-file",
            str(listing),
            "--out",
            str(out),
            "--resolution",
            "60",
            "--triton-url",
            triton.http_url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr
    assert f"ok      {T29UNU}" in done.stdout and "FAILED" in done.stdout
    assert f"collection: {out / COLLECTION_FILE} (1/2 products)" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "kappamask.cli", "batch", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "at least one product" in bad.stderr
