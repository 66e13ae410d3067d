"""`kappamask run` as a user runs it: a subprocess, a real tritonserver, real products."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pystac.validation import JsonSchemaSTACValidator

from kappamask.errors import (
    InferenceUnavailableError,
    InvalidInputError,
    ProductError,
    ProductNotFoundError,
)
from kappamask.inference.server import LocalTriton
from kappamask.pipeline import ASSETS

from .conftest import S3_SECRET, T22HBD, T29UNU, S3Server, check_result

KAPPAMASK = [sys.executable, "-m", "kappamask.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KAPPAMASK, *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
def test_run_starts_its_own_triton_on_the_full_safe_layout(
    tmp_path: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    done = _run("run", str(T22HBD), "--out", str(tmp_path), "--resolution", "60")
    assert done.returncode == 0, done.stderr
    # 1830 px at 60 m: 5 x 5 crops reach 64 px past every edge
    assert "STAC item:" in done.stdout and "25/25 crops" in done.stdout
    item = tmp_path / "S2B_MSIL2A_20210122T133229_N0214_R081_T22HBD_20210122T155500_KAPPAMASK.json"
    data = check_result(item, T22HBD, 60, stac_validator)
    assert data["properties"]["kappamask:processing_baseline"] == "02.14"
    assert "starting Triton" in done.stderr and "Triton stopped" in done.stderr
    # log lines are written above the progress bar, never into it
    for segment in re.split(r"[\r\n]", done.stderr):
        assert not ("%|" in segment and ("INFO" in segment or "WARNING" in segment)), segment


def test_run_a_zip_against_a_running_triton(
    triton: LocalTriton, tmp_path: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    archive = tmp_path / f"{T29UNU.stem}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(T29UNU.rglob("*")):
            if path.is_file():
                zf.write(path, f"{T29UNU.name}/{path.relative_to(T29UNU)}")
    out = tmp_path / "out"
    done = _run(
        "run",
        str(archive),
        "--out",
        str(out),
        "--resolution",
        "60",
        "--triton-url",
        triton.http_url,
    )
    assert done.returncode == 0, done.stderr
    assert "starting Triton" not in done.stderr
    items = list(out.glob("*_KAPPAMASK.json"))
    assert len(items) == 1
    check_result(items[0], T29UNU, 60, stac_validator)
    stats = json.loads(done.stdout.split("classes (% of pixels with data): ")[1].splitlines()[0])
    assert set(stats) == {"clear", "cloud_shadow", "semi_transparent_cloud", "cloud"}
    assert abs(sum(stats.values()) - 100) < 0.01
    assert "% of pixels with data; missing: " in done.stdout


def test_an_l1c_product_through_the_l1c_model(
    triton: LocalTriton, tmp_path: Path, l1c_safe: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    """The stand-in L1C product (13 real L1C bands, compact SAFE layout) at 10 m."""
    done = _run(
        "run",
        str(l1c_safe),
        "--out",
        str(tmp_path / "out"),
        "--resolution",
        "10",
        "--triton-url",
        triton.http_url,
    )
    assert done.returncode == 0, done.stderr
    item = next((tmp_path / "out").glob("*_KAPPAMASK.json"))
    data = check_result(item, l1c_safe, 10, stac_validator)
    assert data["properties"]["kappamask:source_level"] == "L1C"
    assert "kappamask_l1c" in data["properties"]["processing:software"]
    # a cloud-free scene: the bootstrap L1C model calls most of it clear
    assert data["properties"]["kappamask:clear_percentage"] > 80


def test_a_product_that_cannot_be_read_is_said_before_triton_starts(tmp_path: Path) -> None:
    """No Triton URL: the command would start one, but the missing product ends it first."""
    done = _run("run", str(tmp_path / "nope.SAFE"), "--out", str(tmp_path / "out"))
    assert done.returncode == ProductNotFoundError.exit_code
    assert "does not exist" in done.stderr and "starting Triton" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_errors_are_one_clear_line_and_write_nothing(triton: LocalTriton, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the exit code says the class of error (errors.py), the message what happened
    cases = {
        str(tmp_path / "nope.SAFE"): ("does not exist", ProductNotFoundError),
        str(T29UNU / "GRANULE"): ("not a Sentinel-2", ProductError),
    }
    for product, (message, error) in cases.items():
        done = _run("run", product, "--out", str(out), "--triton-url", triton.http_url)
        assert done.returncode == error.exit_code
        assert message in done.stderr and "Traceback" not in done.stderr
    done = _run(
        "run", str(T29UNU), "--out", str(out), "--level", "L1C", "--triton-url", triton.http_url
    )
    assert done.returncode == ProductError.exit_code and "is L2A, not L1C" in done.stderr
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    done = _run(
        "run",
        str(T29UNU),
        "--out",
        str(not_a_folder),
        "--resolution",
        "60",
        "--triton-url",
        triton.http_url,
    )
    assert done.returncode == InvalidInputError.exit_code
    assert "output names a file, not a folder" in done.stderr
    done = _run("run", str(T29UNU), "--out", str(out), "--triton-url", "127.0.0.1:1")
    assert done.returncode == InferenceUnavailableError.exit_code
    assert "Triton" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_run_from_s3_to_s3_with_a_bbox_and_rerun(triton: LocalTriton, s3_server: S3Server) -> None:
    """S3 settings from the environment, as a user sets them; a second run finds the
    result and does not compute it again."""
    from rasterio.warp import transform_bounds

    from kappamask.geometry.grid import output_grid
    from kappamask.sources import open_safe

    grid = output_grid(open_safe(T29UNU), 60)
    left, _bottom, _right, top = grid.bounds
    bbox = transform_bounds(grid.crs, "EPSG:4326", left, top - 9000, left + 9000, top)
    args = [
        "run",
        f"s3://products/zips/{T29UNU.stem}.zip",
        "--out",
        "s3://results/cli",
        "--resolution",
        "60",
        "--bbox",
        *(f"{v:.6f}" for v in bbox),
        "--triton-url",
        triton.http_url,
    ]
    env = {**os.environ, **s3_server.env}
    done = subprocess.run(
        [*KAPPAMASK, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "1/1 crops inferred" in done.stdout
    assert re.search(r"STAC item: +s3://results/cli/", done.stdout)
    assert len(s3_server.keys("results", "cli/")) == len(ASSETS) + 1  # and the item
    again = subprocess.run(
        [*KAPPAMASK, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert again.returncode == 0 and "not computed again" in again.stdout
    assert S3_SECRET not in done.stderr + done.stdout + again.stderr
