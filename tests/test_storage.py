"""Sinks and the reuse of a published result, without a server: a LocalSink publishes
atomically and names its files by path or by the URL the service serves them at; a
complete published result with the same parameters is returned instead of computed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from kappamask.access import AccessPolicy
from kappamask.geometry.grid import Grid
from kappamask.inference.model_spec import ModelSpec
from kappamask.pipeline import ASSETS, _reuse
from kappamask.sources import open_safe
from kappamask.storage.sinks import RESULT_FILES, LocalSink, OutputTarget, output_names
from kappamask.writers.stac_item import WrittenFile, class_statistics, create_item

from .conftest import T29UNU

MODEL = ModelSpec("kappamask_l2a", "L2A", ("AOT",), (1.0,), "v3", "bootstrap", "ab")


def test_a_local_sink_publishes_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with LocalSink(out) as sink:
        sink.path("x.tif").write_bytes(b"1")
        assert not sink.exists("x.tif")  # staged, not published
        assert sink.commit({"mask": "x.tif"}) == {"mask": str(out / "x.tif")}
        assert sink.exists("x.tif") and sink.href("x.tif") == "./x.tif"
    assert [p.name for p in out.iterdir()] == ["x.tif"]  # the staging folder is gone
    with pytest.raises(RuntimeError), LocalSink(tmp_path / "c" / "d") as sink:
        sink.path("y.tif").write_bytes(b"2")
        raise RuntimeError("the run failed")
    assert not (tmp_path / "c").exists()  # the folders it made went with it


def test_served_outputs_are_named_by_url(tmp_path: Path) -> None:
    policy = AccessPolicy(output_roots=(tmp_path,))
    url = "http://example.org:5000/outputs"
    sink = OutputTarget("fields/2024 june", policy, tmp_path, url).open()
    assert isinstance(sink, LocalSink) and sink.absolute_hrefs
    assert sink.href("a b.tif") == f"{url}/fields/2024%20june/a%20b.tif"
    assert sink.final_href("a.tif") == f"{url}/fields/2024%20june/a.tif"
    plain = OutputTarget("fields", policy, tmp_path).open()
    assert isinstance(plain, LocalSink) and not plain.absolute_hrefs
    assert plain.final_href("a.tif") == str(tmp_path / "fields" / "a.tif")


def _publish(folder: Path, parameters: dict[str, object]) -> dict[str, str]:
    product = open_safe(T29UNU)
    names = output_names(product.product_id)
    folder.mkdir(parents=True, exist_ok=True)
    for key in ASSETS:
        (folder / names[key]).write_bytes(b"x")
    counts = np.zeros(256, np.int64)
    counts[:5] = [10, 50, 10, 10, 20]
    grid = Grid("EPSG:32629", Affine(60, 0, 538380, 0, -60, 5869320), 10, 10)
    files = {k: WrittenFile(f"./{names[k]}", 1, "1220" + "0" * 64) for k in ASSETS}
    extra = {
        "kappamask:parameters": parameters,
        "kappamask:product_id": product.product_id,
        "kappamask:crops": {"total": 4, "inferred": 3},
    }
    item = create_item(
        product, grid, class_statistics(counts), files, MODEL, {}, extra_properties=extra
    )
    (folder / names["item"]).write_text(json.dumps(item.to_dict(include_self_link=False)))
    return names


def test_reuse_returns_a_complete_result_with_the_same_parameters(tmp_path: Path) -> None:
    parameters = {
        "resolution": 60,
        "cloud_buffer": 0.0,
        "model": "kappamask_l2a",
        "model_version": "v3",
    }
    names = _publish(tmp_path, parameters)
    with LocalSink(tmp_path) as sink:
        reused = _reuse(sink, names, parameters, time.monotonic())
        assert reused is not None and reused.reused and reused.crops_inferred == 0
        assert reused.crops_total == 4 and reused.statistics["cloud_cover"] == pytest.approx(
            100 * 30 / 90, abs=1e-3
        )
        assert reused.valid == str(tmp_path / names["valid"])
        # other buffers: another result
        assert _reuse(sink, names, {**parameters, "cloud_buffer": 60.0}, 0.0) is None
        # an asset missing: incomplete, computed again
        (tmp_path / names["probability"]).unlink()
        assert _reuse(sink, names, parameters, 0.0) is None


def test_a_result_s_files_are_named_for_every_key_with_the_item_last() -> None:
    names = output_names("P")
    assert tuple(names) == RESULT_FILES and RESULT_FILES[-1] == "item"
    assert len(set(names.values())) == len(names)
