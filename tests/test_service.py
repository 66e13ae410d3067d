"""The OGC API - Processes service over real HTTP: `kappamask serve` (pygeoapi) in a
subprocess, talking to a real tritonserver."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from pystac.validation import JsonSchemaSTACValidator

from kappamask.inference.server import LocalTriton, free_port

from .conftest import DATA, T22HBD, T29UNU, check_result, make_l1c_safe


@dataclass
class Service:
    url: str
    output_dir: Path
    scratch: Path  # a data root the tests may put broken products in

    def execute(self, body: object, raw: str | None = None) -> requests.Response:
        url = f"{self.url}/processes/kappamask/execution"
        if raw is not None:
            return requests.post(
                url, data=raw, headers={"Content-Type": "application/json"}, timeout=600
            )
        return requests.post(url, json=body, timeout=600)


@pytest.fixture(scope="module")
def service(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("service")
    scratch = base / "scratch"
    scratch.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "KAPPAMASK_JOB_OUTPUT_DIR": str(base / "jobs"),
        "KAPPAMASK_JOBS_DB": str(base / "jobs.db"),
    }
    log = (base / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kappamask.cli", "serve", "--port", str(port),
         "--triton-url", triton.http_url,
         "--output-dir", str(base / "out"), "--data-root", str(DATA), "--data-root", str(scratch)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/processes", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("kappamask serve did not start:\n" + (base / "serve.log").read_text())
            time.sleep(0.3)
        yield Service(url, base / "out", scratch)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()


def test_process_is_listed_and_described(service: Service) -> None:
    listing = requests.get(f"{service.url}/processes", timeout=10).json()
    assert "kappamask" in [p["id"] for p in listing["processes"]]
    desc = requests.get(f"{service.url}/processes/kappamask", timeout=10).json()
    assert desc["jobControlOptions"] == ["sync-execute", "async-execute"]
    assert desc["inputs"]["product"]["schema"]["type"] == "string"
    assert desc["inputs"]["resolution"]["schema"]["enum"] == [10, 20, 60]
    assert desc["outputs"]["result"]["schema"]["type"] == "object"
    assert "product" in desc["example"]["inputs"]


@pytest.mark.parametrize("product", [T29UNU, T22HBD], ids=["T29UNU", "T22HBD"])
def test_sync_execution_returns_the_hrefs(
    service: Service, product: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    response = service.execute({"inputs": {"product": str(product), "resolution": 60}})
    assert response.status_code == 200, response.text
    result = response.json()
    for key in ("mask", "confidence", "preview", "item"):
        assert Path(result[key]).is_file()
    assert result["mask"].endswith("_KAPPAMASK.tif")
    check_result(Path(result["item"]), product, 60, stac_validator)
    assert set(result["class_percentages"]) >= {"clear", "cloud", "cloud_shadow", "missing"}


def _broken_copy(service: Service, name: str) -> Path:
    dst = service.scratch / name / T29UNU.name
    shutil.copytree(T29UNU, dst)
    return dst


def test_bad_input_gets_a_clear_error_and_writes_nothing(service: Service) -> None:
    missing_band = _broken_copy(service, "missing_band")
    for path in missing_band.glob("GRANULE/*/IMG_DATA/R60m/*_B11_60m.jp2"):
        path.unlink()
    l1c = make_l1c_safe(service.scratch / "l1c")
    corrupt = _broken_copy(service, "corrupt")
    jp2 = next(corrupt.glob("GRANULE/*/IMG_DATA/R60m/*_B03_60m.jp2"))
    jp2.write_bytes(jp2.read_bytes()[:3000])
    cases = [
        ({"inputs": {"product": "/etc"}}, "outside the data roots"),
        ({"inputs": {"product": str(DATA / "s2" / "nope.SAFE")}}, "does not exist"),
        ({"inputs": {"product": str(DATA / "metadata")}}, "not a Sentinel-2"),
        ({"inputs": {"product": str(T29UNU), "colour": "red"}}, "unknown input(s): colour"),
        ({"inputs": {"product": str(T29UNU), "resolution": 30}}, "resolution"),
        ({"inputs": {}}, "'product' is required"),
        ({"inputs": {"product": str(T29UNU), "resolution": 60, "level": "L1C"}}, "is L2A, not L1C"),
        ({"inputs": {"product": str(missing_band), "resolution": 60}}, "lacks band(s) B11"),
        ({"inputs": {"product": str(corrupt), "resolution": 60}}, "B03"),
        ({"inputs": {"product": str(l1c), "resolution": 60}}, "no model for L1C"),
    ]
    for body, message in cases:
        response = service.execute(body)
        assert response.status_code == 400, (body, response.text)
        assert message in response.json()["description"], (body, response.text)
    response = service.execute(None, raw='{"inputs": {"product": ')
    assert response.status_code == 400
    # nothing half-written: only complete results (from the successful tests) or nothing
    if service.output_dir.exists():
        leftovers = [
            p.name for p in service.output_dir.iterdir() if p.name.startswith(".kappamask")
        ]
        assert leftovers == []


def _tritonservers_on(port: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"tritonserver")
            and f"--http-port={port}".encode() in cmdline
        ):
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_stopping_the_service_stops_its_local_triton(tmp_path: Path, stop: signal.Signals) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kappamask.cli", "serve", "--port", str(port),
             "--output-dir", str(tmp_path / "out"), "--data-root", str(DATA)],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "KAPPAMASK_JOB_OUTPUT_DIR": str(tmp_path / "jobs"),
                 "KAPPAMASK_JOBS_DB": str(tmp_path / "jobs.db")},
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while "KappaMask service on" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        triton_port = int(log_path.read_text().split("starting Triton on 127.0.0.1:")[1].split()[0])
        assert len(_tritonservers_on(triton_port)) == 1
        proc.send_signal(stop)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _tritonservers_on(triton_port) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _tritonservers_on(triton_port) == []
