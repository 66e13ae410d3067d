"""The STAC item: class statistics by hand, the item against the official schemas."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from affine import Affine
from pystac.validation import JsonSchemaSTACValidator

from kappamask.geometry.grid import Grid
from kappamask.inference.model_spec import ModelSpec
from kappamask.pipeline import ASSETS
from kappamask.sources import open_safe
from kappamask.writers.stac_item import WrittenFile, class_statistics, create_item, read_item

from .conftest import T29UNU, validate_item


def test_class_statistics_by_hand() -> None:
    counts = np.zeros(256, dtype=np.int64)
    counts[:5] = [20, 40, 10, 10, 20]  # missing, clear, shadow, semi, cloud
    stats = class_statistics(counts)
    assert stats["missing"] == 20.0
    assert stats["clear"] == 50.0 and stats["cloud_shadow"] == 12.5
    assert stats["semi_transparent_cloud"] == 12.5 and stats["cloud"] == 25.0
    assert stats["cloud_cover"] == 37.5
    assert class_statistics(np.zeros(256))["cloud_cover"] == 0.0
    # with an AOI: missing of the area's pixels (the raster's 100 include 20 outside it)
    inside = class_statistics(counts, area_pixels=90)
    assert inside["missing"] == pytest.approx(100 * 10 / 90)
    assert inside["cloud_cover"] == 37.5  # of the pixels with data, as without an area


def test_item_validates_and_carries_the_source(stac_validator: JsonSchemaSTACValidator) -> None:
    product = open_safe(T29UNU)
    grid = Grid("EPSG:32629", Affine(60, 0, 538380, 0, -60, 5869320), 544, 544)
    counts = np.bincount(np.array([0, 1, 1, 4], dtype=np.uint8), minlength=256)
    files = {k: WrittenFile(f"./{k}.tif", 100, "1220" + "0" * 64) for k in ASSETS}
    model = ModelSpec(
        "kappamask_l2a",
        "L2A",
        ("AOT",),
        (1.0,),
        "bootstrap-test",
        runtime="openvino",
        precision="bf16",
    )
    item = create_item(
        product,
        grid,
        class_statistics(counts),
        files,
        model,
        {"B08": "B8A"},
        processed=datetime(2026, 1, 1, tzinfo=UTC),
    )
    data = item.to_dict(include_self_link=False)
    validate_item(data, stac_validator)
    props = data["properties"]
    assert props["datetime"].startswith("2022-10-05T11:56:49")
    assert props["proj:code"] == "EPSG:32629" and props["proj:shape"] == [544, 544]
    assert props["eo:cloud_cover"] == pytest.approx(100 / 3, abs=1e-3)
    assert props["kappamask:missing_percentage"] == 25.0
    assert props["processing:software"]["kappamask_l2a"] == "bootstrap-test"
    assert props["processing:software"]["triton-runtime"] == "openvino, bf16"  # how it ran
    assert props["kappamask:model"] == {
        "name": "kappamask_l2a",
        "version": "bootstrap-test",
        "origin": "unknown",
        "architecture": "unet",
        "onnx_sha256": "",
    }
    assert "weights of unrecorded origin" in props["processing:lineage"]
    assert props["kappamask:substituted_bands"] == {"B08": "B8A"}
    classes = data["assets"]["mask"]["classification:classes"]
    assert [c["value"] for c in classes] == [0, 1, 2, 3, 4]
    assert data["assets"]["preview"]["roles"] == ["overview"]
    assert data["assets"]["mask"]["roles"] == ["data", "cloud", "cloud-shadow"]
    assert data["assets"]["valid"]["roles"] == ["data-mask"]
    assert data["assets"]["probability"]["raster:bands"][0]["nodata"] == 255
    assert [c["value"] for c in data["assets"]["valid"]["classification:classes"]] == [1, 0, 255]
    assert any(link["rel"] == "derived_from" for link in data["links"])
    # served over HTTP or on S3, a server path would lead a client nowhere: left out; a
    # URL stays
    args = (grid, class_statistics(counts), files, model, {})
    served = create_item(product, *args, local_paths=False).to_dict(include_self_link=False)
    assert not any(link["rel"] == "derived_from" for link in served["links"])
    remote = dataclasses.replace(product, href="https://example.com/items/x.json")
    linked = create_item(remote, *args, local_paths=False).to_dict(include_self_link=False)
    assert [lk["href"] for lk in linked["links"] if lk["rel"] == "derived_from"] == [remote.href]
    # the geometry is the tile footprint clipped to the output grid: inside the grid bbox
    west, south, east, north = data["bbox"]
    assert -8.5 < west < east < -7.0 and 52.0 < south < north < 53.5


def test_the_offline_validator_really_checks_extensions(
    stac_validator: JsonSchemaSTACValidator,
) -> None:
    product = open_safe(T29UNU)
    grid = Grid("EPSG:32629", Affine(60, 0, 538380, 0, -60, 5869320), 544, 544)
    files = {k: WrittenFile(f"./{k}.tif", 1, "1220" + "0" * 64) for k in ASSETS}
    model = ModelSpec("kappamask_l2a", "L2A", ("AOT",), (1.0,), "v")
    data = create_item(product, grid, class_statistics(np.ones(256)), files, model, {}).to_dict(
        include_self_link=False
    )
    data["assets"]["mask"]["classification:classes"][0]["color_hint"] = "not a colour"
    with pytest.raises(Exception, match=r"color_hint|does not match"):
        validate_item(data, stac_validator)


def test_read_item_gives_back_what_create_item_wrote() -> None:
    """The reuse of a published result reads the item it wrote: a round trip."""
    product = open_safe(T29UNU)
    grid = Grid("EPSG:32629", Affine(60, 0, 538380, 0, -60, 5869320), 544, 544)
    files = {k: WrittenFile(f"./{k}.tif", 1, "1220" + "0" * 64) for k in ASSETS}
    model = ModelSpec("kappamask_l2a", "L2A", ("AOT",), (1.0,), "v", "bootstrap", "ab12")
    counts = np.zeros(256, dtype=np.int64)
    counts[:5] = [7, 40, 10, 10, 20]
    stats = class_statistics(counts, area_pixels=90)
    parameters = {"resolution": 60, "cloud_buffer": 120.0}
    item = create_item(
        product,
        grid,
        stats,
        files,
        model,
        {},
        extra_properties={
            "kappamask:parameters": parameters,
            "kappamask:product_id": product.product_id,
            "kappamask:crops": {"total": 4, "inferred": 3},
        },
    )
    recorded = read_item(json.dumps(item.to_dict(include_self_link=False)))
    assert recorded is not None
    assert recorded.statistics == pytest.approx(stats)
    assert recorded.parameters == parameters and recorded.crops_total == 4
    assert recorded.product_id == product.product_id and recorded.level == "L2A"
    assert recorded.model_provenance == model.provenance()
    assert read_item(b"not json") is None and read_item('{"properties": {}}') is None
