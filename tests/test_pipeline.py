"""The whole pipeline against a real tritonserver, called as a library."""

from __future__ import annotations

from pathlib import Path

import pytest
from pystac.validation import JsonSchemaSTACValidator

from kappamask.errors import CancelledError, NoModelError, ProductError
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.pipeline import RunOptions, run

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
    assert result.crops_total == 4 and result.crops_inferred == 3  # one crop is all no-data
    assert progress[0] == 5 and progress[-1] == 95 and progress == sorted(progress)
    item = check_result(result.item, T29UNU, 60, stac_validator)
    assert item["properties"]["kappamask:substituted_bands"] == {"B08": "B8A"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (result.mask, result.confidence, result.preview, result.item)
    )


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
    with pytest.raises(NoModelError, match="no model for L1C"):
        client.model("L1C")
    with pytest.raises(CancelledError):
        run(str(T22HBD), tmp_path, client, RunOptions(resolution=60), cancelled=lambda: True)
    assert list(tmp_path.iterdir()) == []
