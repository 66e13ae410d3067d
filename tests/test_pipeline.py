"""The whole pipeline against a real tritonserver, called as a library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pystac.validation import JsonSchemaSTACValidator

from kappamask.errors import CancelledError, NoModelError, ProductError
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import run

from .conftest import T22HBD, T29UNU, check_result


@pytest.fixture
def client(triton: LocalTriton) -> TritonClient:
    with TritonClient(triton.http_url) as c:
        yield c


def test_t29unu_at_60m(
    client: TritonClient, tmp_path: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    progress: list[int] = []
    result = run(
        str(T29UNU),
        tmp_path,
        client,
        RunOptions(resolution=60),
        progress=lambda p, _m: progress.append(p),
    )
    # the four crops, centred on the raster, all reach some of its data
    assert result.crops_total == 4 and result.crops_inferred == 4
    assert progress[0] == 5 and progress[-1] == 95 and progress == sorted(progress)
    item = check_result(result.item, T29UNU, 60, stac_validator)
    assert item["properties"]["kappamask:substituted_bands"] == {"B08": "B8A"}
    hrefs = result.files.values()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name for p in hrefs)


def test_grpc_gives_the_same_mask(
    triton: LocalTriton, client: TritonClient, tmp_path: Path
) -> None:
    import rasterio

    a = run(str(T29UNU), tmp_path / "http", client, RunOptions(resolution=60))
    with TritonClient(triton.grpc_url, "grpc") as grpc_client:
        b = run(str(T29UNU), tmp_path / "grpc", grpc_client, RunOptions(resolution=60))
    with rasterio.open(a.mask) as ra, rasterio.open(b.mask) as rb:
        assert (ra.read(1) == rb.read(1)).all()


def test_wrong_level_no_model_and_cancel_leave_nothing(
    client: TritonClient, tmp_path: Path
) -> None:
    with pytest.raises(ProductError, match="is L2A, not L1C"):
        run(str(T29UNU), tmp_path, client, RunOptions(resolution=60, level="L1C"))
    with pytest.raises(NoModelError, match="is for L1C products, not L2A"):
        run(str(T29UNU), tmp_path, client, RunOptions(resolution=60, model="kappamask_l1c"))
    with pytest.raises(NoModelError, match="not bootstrap-x as requested"):
        run(str(T29UNU), tmp_path, client, RunOptions(60, model="kappamask_l2a:bootstrap-x"))
    with pytest.raises(CancelledError):
        run(str(T22HBD), tmp_path, client, RunOptions(resolution=60), cancelled=lambda: True)
    assert list(tmp_path.iterdir()) == []


def _lonlat_box(grid_bounds: tuple[float, float, float, float], crs: str) -> list[float]:
    from rasterio.warp import transform_bounds

    return list(transform_bounds(crs, "EPSG:4326", *grid_bounds))


def test_bbox_and_aoi_limit_the_output_and_the_crops(client: TritonClient, tmp_path: Path) -> None:
    import numpy as np
    import rasterio
    from shapely.geometry import Polygon, mapping

    from kappamask.geometry.grid import output_grid
    from kappamask.sources import open_safe

    grid = output_grid(open_safe(T29UNU), 60)
    left, _bottom, _right, top = grid.bounds
    # the north-west quarter: one crop instead of four, and a smaller raster
    quarter = (left + 600, top - 12000, left + 12000, top - 600)
    bbox = _lonlat_box(quarter, grid.crs)
    result = run(str(T29UNU), tmp_path / "bbox", client, RunOptions(60, bbox=tuple(bbox)))
    assert result.crops_total == 1 and result.crops_inferred == 1
    with rasterio.open(result.mask) as src:
        sub = src.read(1)
        b = src.bounds
    # the output covers the box (snapped outwards to whole pixels), not the product
    assert b.left <= quarter[0] + 60 and b.top >= quarter[3] - 60
    assert src.width < grid.width // 2 + 20 and src.height < grid.height // 2 + 20
    item = json.loads(Path(result.item).read_text())
    assert item["properties"]["kappamask:parameters"]["bbox"] == bbox

    # a triangle: pixels outside it are missing
    tri = Polygon([(quarter[0], quarter[1]), (quarter[2], quarter[1]), (quarter[0], quarter[3])])
    from rasterio.warp import transform_geom

    aoi = transform_geom(grid.crs, "EPSG:4326", mapping(tri))
    result = run(str(T29UNU), tmp_path / "aoi", client, RunOptions(60, aoi=dict(aoi)))
    with rasterio.open(result.mask) as src:
        tri_mask = src.read(1)
    w = tri_mask.shape[1]
    # the grid is the triangle's bounding box; about half of it lies outside: missing
    inside = tri_mask != 0
    assert 0.2 < inside.mean() < 0.65
    assert (tri_mask[:5, w - 5 :] == 0).all()  # the far corner is outside the triangle
    assert np.count_nonzero(tri_mask) < np.count_nonzero(sub)

    far_away = [10.0, 45.0, 10.5, 45.5]
    with pytest.raises(ProductError, match="outside the product"):
        run(str(T29UNU), tmp_path / "far", client, RunOptions(60, bbox=tuple(far_away)))
    assert not any((tmp_path / "far").glob("*KAPPAMASK*"))


def test_chunks_outside_the_aoi_are_neither_read_nor_sent(
    client: TritonClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An L-shaped AOI over the whole tile at 10 m: the far corner's chunks are skipped."""
    import numpy as np
    import rasterio
    from rasterio.warp import transform_geom
    from rasterio.windows import Window

    from kappamask.geometry.grid import output_grid
    from kappamask.reading.reader import BandReader
    from kappamask.sources import open_safe

    grid = output_grid(open_safe(T29UNU), 10)
    left, bottom, right, top = grid.bounds
    arm = 4000.0  # metres: 400 px along the west and north edges
    ring = [
        (left, top),
        (right, top),
        (right, top - arm),
        (left + arm, top - arm),
        (left + arm, bottom),
        (left, bottom),
        (left, top),
    ]
    aoi = transform_geom(grid.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    windows: list[Window] = []
    original = BandReader.read

    def recording(self: BandReader, window: Window) -> tuple[np.ndarray, np.ndarray]:
        windows.append(window)
        return original(self, window)

    monkeypatch.setattr(BandReader, "read", recording)
    result = run(str(T29UNU), tmp_path, client, RunOptions(10, aoi=dict(aoi)))
    assert result.crops_total == 64
    # the first two crop rows and columns (the grid starts 192 px before the raster, so
    # the 400 px arms reach into the second), less the crops of the no-data wedge
    assert 0 < result.crops_inferred <= 28
    assert 0 < len(windows) < 16  # 8 strips x 2 chunks, the far ones skipped
    margin = 5  # px: the reprojected AOI's edges are not exactly the grid's
    assert all(w.col_off < 400 + margin or w.row_off < 400 + margin for w in windows)
    with rasterio.open(result.mask) as src:
        mask = src.read(1)
    assert (mask[400 + margin :, 400 + margin :] == 0).all()
    assert (mask[: 400 - margin, : 400 - margin] != 0).any()


@pytest.mark.slow
def test_a_level_without_a_served_model(l1c_safe: Path, tmp_path: Path) -> None:
    """A Triton that serves only the L2A model: an L1C product gets "no model for L1C"."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY

    with (
        LocalTriton(DEFAULT_REPOSITORY, models=["kappamask_l2a"]) as only_l2a,
        TritonClient(only_l2a.http_url) as client,
        pytest.raises(NoModelError, match="no model for L1C"),
    ):
        run(str(l1c_safe), tmp_path / "out", client, RunOptions(resolution=60))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_mask_does_not_depend_on_where_crops_are_cut(
    client: TritonClient, tmp_path: Path
) -> None:
    """The real T29UNU at 20 m through two crop grids (64 and 96 px overlaps: every crop
    boundary moves): the blended masks agree on all but a sliver of cloud edges, and no
    crop boundary or outer row/column changes class much more often than the median."""
    import rasterio

    from kappamask.tools.evaluate import seam_report

    masks = []
    for overlap in (64, 96):
        result = run(
            str(T29UNU), tmp_path / str(overlap), client, RunOptions(resolution=20), overlap=overlap
        )
        with rasterio.open(result.mask) as src:
            masks.append(src.read(1))
    data = masks[0] != 0
    assert (masks[0][data] == masks[1][data]).mean() > 0.99
    report = seam_report(Path(result.mask))
    for axis in ("rows", "columns"):
        assert report[axis]["worst_crop_ratio"] < 2.5, report
        assert max(report[axis]["outer_ratios"]) < 2.5, report
