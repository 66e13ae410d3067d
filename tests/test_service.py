"""The OGC API - Processes service over real HTTP: `kappamask serve` (pygeoapi) in a
subprocess, talking to a real tritonserver."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import rasterio
import requests
from pystac.validation import JsonSchemaSTACValidator

from kappamask.inference.model_spec import ORIGIN_BOOTSTRAP
from kappamask.inference.repository import DEFAULT_REPOSITORY, config_parameters, spec_from_onnx
from kappamask.inference.server import LocalTriton, free_port
from kappamask.pipeline import ASSETS

from .conftest import (
    DATA,
    S3_SECRET,
    STAC,
    T22HBD,
    T29UNU,
    S3Server,
    check_result,
)
from .processes import (
    alive,
    process_group,
    service_args,
    start_serve,
    stop,
    submit_async,
    triton_port,
    tritonservers_on,
    wait_for,
)

ASSET_KEYS = (*ASSETS, "item")


@dataclass
class Service:
    url: str
    output_dir: Path
    scratch: Path  # a data root the tests may put broken products in
    log: Path
    jobs_db: Path
    #: The URL the service names itself by (KAPPAMASK_PUBLIC_URL's default).
    public_url: str

    def local(self, href: str) -> Path:
        """The file behind a result's URL (the service serves its output folder)."""
        prefix = f"{self.public_url}/outputs/"
        assert href.startswith(prefix), href
        return self.output_dir / unquote(href[len(prefix) :])

    def execute(self, body: object, raw: str | None = None) -> requests.Response:
        url = f"{self.url}/processes/kappamask/execution"
        if raw is not None:
            return requests.post(
                url, data=raw, headers={"Content-Type": "application/json"}, timeout=600
            )
        return requests.post(url, json=body, timeout=600)


@pytest.fixture(scope="module")
def service(
    triton: LocalTriton, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """`kappamask serve` with the local S3 server's credentials in its environment, one
    inference slot (so a second job has to wait), and 127.0.0.1 among the allowed hosts
    but private addresses refused (so the address check itself is exercised)."""
    base = tmp_path_factory.mktemp("service")
    scratch = base / "scratch"
    scratch.mkdir()
    port = free_port()
    env = {
        **os.environ,
        **s3_server.env,
        "KAPPAMASK_JOB_OUTPUT_DIR": str(base / "jobs"),
        "KAPPAMASK_JOBS_DB": str(base / "jobs.db"),
        "KAPPAMASK_MAX_CONCURRENT_JOBS": "1",
        "KAPPAMASK_ALLOWED_HOSTS": "127.0.0.1,*.amazonaws.com",
        "KAPPAMASK_ALLOW_PRIVATE_NETWORKS": "false",
    }
    log_path = base / "serve.log"
    args = ["--port", str(port), *service_args(triton.http_url, base / "out", DATA, scratch)]
    proc = start_serve(args, log_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, proc, log_path)
        yield Service(
            url, base / "out", scratch, log_path, base / "jobs.db", f"http://localhost:{port}"
        )
    finally:
        stop(proc)


def test_process_is_listed_and_described(service: Service) -> None:
    listing = requests.get(f"{service.url}/processes", timeout=10).json()
    assert "kappamask" in [p["id"] for p in listing["processes"]]
    desc = requests.get(f"{service.url}/processes/kappamask", timeout=10).json()
    assert desc["jobControlOptions"] == ["sync-execute", "async-execute"]
    assert [s["type"] for s in desc["inputs"]["product"]["schema"]["oneOf"]] == ["string", "object"]
    assert {"bbox", "aoi", "output", "model", "overwrite", "level"} <= set(desc["inputs"])
    assert desc["inputs"]["resolution"]["schema"]["enum"] == [10, 20, 60]
    assert desc["outputs"]["result"]["schema"]["type"] == "object"
    assert "product" in desc["example"]["inputs"]


def test_start_up_log_names_the_weights(service: Service) -> None:
    log = service.log.read_text()
    for level, name in (("L1C", "kappamask_l1c"), ("L2A", "kappamask_l2a")):
        onnx_file = DEFAULT_REPOSITORY / name / "1" / "model.onnx"
        version = spec_from_onnx(onnx_file).version_label
        digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
        assert f"{level}: {name} {version}, bootstrap weights, ONNX sha256 {digest}" in log
        assert f"{level} masks come from bootstrap weights, not KappaZeta's" in log
        # and how they run: this service's Triton is an external one (the session's), whose
        # CPU the service cannot judge: the config's own words
        parameters = config_parameters(onnx_file.parents[1] / "config.pbtxt")
        declared = f"{parameters['runtime']}, {parameters['precision']}"
        assert f"ONNX sha256 {digest}, runs on {declared}" in log


@pytest.mark.parametrize("product", [T29UNU, T22HBD], ids=["T29UNU", "T22HBD"])
def test_sync_execution_returns_the_hrefs(
    service: Service, product: Path, stac_validator: JsonSchemaSTACValidator
) -> None:
    response = service.execute({"inputs": {"product": str(product), "resolution": 60}})
    assert response.status_code == 200, response.text
    result = response.json()
    for key in ASSET_KEYS:  # URLs where the service serves its output folder
        assert service.local(result[key]).is_file()
    assert result["mask"].endswith("_KAPPAMASK.tif")
    check_result(service.local(result["item"]), product, 60, stac_validator)
    classes = result["class_percentages"]
    assert set(classes) == {"clear", "cloud_shadow", "semi_transparent_cloud", "cloud"}
    assert sum(classes.values()) == pytest.approx(100, abs=0.01)  # of the pixels with data
    assert result["cloud_cover"] == pytest.approx(
        classes["cloud"] + classes["semi_transparent_cloud"], abs=0.01
    )
    assert 0 < result["missing_percentage"] < 100  # of every pixel: the nodata wedge
    # the result names the weights that made it: the served L2A model's own file
    onnx_file = DEFAULT_REPOSITORY / "kappamask_l2a" / "1" / "model.onnx"
    assert result["model_provenance"] == {
        "name": "kappamask_l2a",
        "version": result["model_version"],
        "origin": ORIGIN_BOOTSTRAP,
        "architecture": "unet",
        "onnx_sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
    }
    item = json.loads(service.local(result["item"]).read_text())
    assert item["properties"]["kappamask:model"] == result["model_provenance"]
    assert "not KappaZeta's published ones" in item["properties"]["processing:lineage"]


def _broken_copy(service: Service, name: str) -> Path:
    dst = service.scratch / name / T29UNU.name
    shutil.copytree(T29UNU, dst)
    return dst


def _stac_item() -> dict[str, Any]:
    """A real Earth Search item without the product URI, so that its id names the files."""
    item = json.loads((STAC / "earth-search-v0_S2A_28QCH_20200714_0_L2A.json").read_text())
    item["properties"].pop("sentinel:product_id")
    return dict(item)


def _error_cases(service: Service, s3_server: S3Server) -> list[tuple[str, object, int, str]]:
    """The README's error table: (row, request body, HTTP status, text of the message)."""
    missing_band = _broken_copy(service, "missing_band")
    for path in missing_band.glob("GRANULE/*/IMG_DATA/R60m/*_B11_60m.jp2"):
        path.unlink()
    corrupt = _broken_copy(service, "corrupt")
    jp2 = next(corrupt.glob("GRANULE/*/IMG_DATA/R60m/*_B03_60m.jp2"))
    jp2.write_bytes(jp2.read_bytes()[:3000])
    archive = Path(
        shutil.make_archive(str(service.scratch / "t"), "zip", T29UNU.parent, T29UNU.name)
    )
    truncated = service.scratch / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    s3_server.upload_tree(T22HBD, "products", f"private-http/{T22HBD.name}")
    p = str(T29UNU)

    def inputs(**kw: object) -> dict[str, object]:
        # a folder no case may write to: nothing there to reuse, nothing left behind
        return {"inputs": {"resolution": 60, "output": "errors", **kw}}

    return [
        ("unknown input name", inputs(product=p, colour="red"), 400, "unknown input(s): colour"),
        (
            "callback on a private address",
            {**inputs(product=p), "subscriber": {"successUri": "http://127.0.0.1:9/done"}},
            403,
            "is a loopback or private address",
        ),
        (
            "callback URL not http(s)",
            {**inputs(product=p), "subscriber": {"successUri": "ftp://example.org/done"}},
            400,
            "only http(s) and s3 URLs are accepted",
        ),
        ("no product", {"inputs": {}}, 400, "'product' is required"),
        (
            "negative buffer",
            inputs(product=p, cloud_buffer=-30),
            400,
            "input 'cloud_buffer' must be a number of metres from 0 to 1000",
        ),
        (
            "buffer over 1000 m",
            inputs(product=p, shadow_buffer=5000),
            400,
            "input 'shadow_buffer' must be a number of metres from 0 to 1000",
        ),
        (
            "buffer not a number",
            inputs(product=p, cloud_buffer="100m"),
            400,
            "input 'cloud_buffer' must be a number of metres from 0 to 1000",
        ),
        (
            "product string too long",
            inputs(product="x" * 100_000),
            400,
            "input 'product' is 100000 characters long; at most 2048",
        ),
        (
            "control character in output",
            inputs(product=p, output="a\x00b"),
            400,
            "input 'output' holds a NUL character",
        ),
        (
            "malformed model name",
            inputs(product=p, model="kappamask_l2a/versions/1"),
            400,
            "input 'model' must be a model name",
        ),
        ("resolution not offered", inputs(product=p, resolution=30), 400, "'resolution'"),
        ("malformed bbox", inputs(product=p, bbox=[1, 2, 3]), 400, "'bbox'"),
        (
            "malformed aoi",
            inputs(product=p, aoi={"type": "Point", "coordinates": [0, 0]}),
            400,
            "'aoi' must be a GeoJSON Polygon",
        ),
        ("overwrite not boolean", inputs(product=p, overwrite="yes"), 400, "'overwrite'"),
        ("not a STAC item", inputs(product={"type": "Feature"}), 400, "not a STAC item"),
        (
            "product id that is a path",
            inputs(product={**_stac_item(), "id": "/tmp/kappamask-probe/NAME"}),
            400,
            "is not a Sentinel-2 product name",
        ),
        (
            "output in a hidden folder",
            inputs(product=p, output=".jobs"),
            403,
            "output folder .jobs names a hidden folder",
        ),
        ("file:// URL", inputs(product="file:///etc/passwd"), 400, "file://"),
        ("path outside the data roots", inputs(product="/etc"), 403, "outside the data roots"),
        (
            "URL to a host not configured",
            inputs(product="https://example.com/item.json"),
            403,
            "not among the hosts",
        ),
        (
            "URL to a loopback/private address",
            inputs(product="http://127.0.0.1:9/item.json"),
            403,
            "loopback or private",
        ),
        (
            "output outside the output roots",
            inputs(product=p, output="/tmp/elsewhere"),
            403,
            "outside the output roots",
        ),
        (
            "access denied by the storage",
            inputs(product=f"s3://products/private-http/{T22HBD.name}"),
            403,
            "access denied",
        ),
        (
            "product path does not exist",
            inputs(product=str(DATA / "s2" / "nope.SAFE")),
            404,
            "does not exist",
        ),
        (
            "unknown bucket",
            inputs(product="s3://no-such-bucket/x.SAFE"),
            404,
            "bucket does not exist",
        ),
        ("unknown key", inputs(product="s3://products/nope.SAFE"), 404, "no such key"),
        (
            "unknown output bucket",
            inputs(product=p, output="s3://no-such-bucket/out"),
            404,
            "bucket does not exist",
        ),
        (
            "not a Sentinel-2 product",
            inputs(product=str(DATA / "metadata")),
            422,
            "not a Sentinel-2",
        ),
        ("truncated zip", inputs(product=str(truncated)), 422, "not a readable zip"),
        ("missing band", inputs(product=str(missing_band)), 422, "lacks band(s) B11"),
        ("corrupt JP2", inputs(product=str(corrupt)), 422, "B03"),
        ("level other than requested", inputs(product=p, level="L1C"), 422, "is L2A, not L1C"),
        (
            "model for another level",
            inputs(product=p, model="kappamask_l1c"),
            422,
            "is for L1C products, not L2A",
        ),
        ("unknown model", inputs(product=p, model="kappamask_nope"), 422, "is not served"),
        (
            "bbox outside the product",
            inputs(product=p, bbox=[10, 45, 10.5, 45.5]),
            422,
            "outside the product",
        ),
    ]


#: Request bodies pygeoapi never sees (kappamask.api.guard): (row, raw body, status, message).
_BODY_CASES = [
    ("malformed JSON", '{"inputs": {"product": ', 400, "request body is not valid JSON"),
    ("body not an object", "[1, 2, 3]", 400, "must be a JSON object, not list"),
    ("body nested too deep", "[" * 100_000 + "]" * 100_000, 400, "nested deeper than 32"),
    (
        "body over the size limit",
        '{"inputs": "' + "x" * 2_000_000 + '"}',
        413,
        "over this server's limit of 1048576 bytes",
    ),
    ("empty body", "", 400, "request body is empty"),
    (
        "lone surrogate in a string",
        '{"inputs": {"product": "\\ud800"}}',
        400,
        "input 'product' holds a lone UTF-16 surrogate",
    ),
    (
        "subscriber not an object",
        '{"inputs": {}, "subscriber": 5}',
        400,
        "'subscriber' must be a JSON object",
    ),
]


@pytest.fixture(scope="module")
def error_cases(service: Service, s3_server: S3Server) -> list[tuple[str, object, int, str]]:
    return _error_cases(service, s3_server)


def test_bad_input_gets_a_clear_error_and_writes_nothing(
    service: Service, s3_server: S3Server, error_cases: list[tuple[str, object, int, str]]
) -> None:
    with s3_server.denied("products", "s3:GetObject", "private-http/*"):
        for row, body, status, message in error_cases:
            response = service.execute(body)
            assert response.status_code == status, (row, response.text)
            assert message in response.json()["description"], (row, response.text)
    for row, raw, status, message in _BODY_CASES:
        response = service.execute(None, raw=raw)
        assert response.status_code == status, (row, response.text)
        assert response.headers["Content-Type"] == "application/json", row
        assert message in response.json()["description"], (row, response.text)
    # nothing half-written
    assert not (service.output_dir / "errors").exists()
    assert s3_server.keys("results", "out/") == []


def test_error_table_in_readme_matches_the_tests(
    error_cases: list[tuple[str, object, int, str]],
) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("<!-- error-table -->")[1]  # between the two markers
    rows = {
        tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        for line in table.splitlines()
        if line.startswith("|") and not line.startswith("|---") and "| HTTP |" not in line
    }
    cases = {(row, str(status)) for row, _b, status, _m in [*error_cases, *_BODY_CASES]}
    assert {(r[0], r[1]) for r in rows} == cases


def _poll(service: Service, job_url: str, until: set[str], timeout: float = 300) -> list[dict]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(job_url, timeout=10).json()
        seen.append(job)
        if job["status"] in until:
            return seen
        time.sleep(0.1)
    pytest.fail(f"job {job_url} did not reach {until}: {seen[-1]}")


def test_callback_urls_pass_the_url_policy_at_submission(service: Service) -> None:
    """The service refuses private addresses: a subscriber on 127.0.0.1 is a 403 before any
    job exists, even an asynchronous one; another scheme is a 400 (the error table has the
    synchronous rows; tests/test_callbacks.py delivers callbacks)."""
    jobs = requests.get(f"{service.url}/jobs", params={"f": "json"}, timeout=10).json()["jobs"]
    inputs = {"product": str(T29UNU), "resolution": 60, "output": "callback"}
    for subscriber, status, says in (
        ({"successUri": "http://127.0.0.1:9/done"}, 403, "loopback or private"),
        ({"successUri": "ftp://example.org/done"}, 400, "only http"),
    ):
        response = requests.post(
            f"{service.url}/processes/kappamask/execution",
            json={"inputs": inputs, "subscriber": subscriber},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert response.status_code == status, response.text
        assert says in response.json()["description"]
    after = requests.get(f"{service.url}/jobs", params={"f": "json"}, timeout=10).json()["jobs"]
    assert len(after) == len(jobs)
    assert not (service.output_dir / "callback").exists()


def test_async_execution_reports_progress(service: Service) -> None:
    job_url = submit_async(
        service.url, {"product": str(T29UNU), "resolution": 20, "output": "async"}
    )
    seen = _poll(service, job_url, {"successful", "failed"})
    assert seen[-1]["status"] == "successful", seen[-1]
    progress = [j["progress"] for j in seen if j["status"] == "running"]
    assert progress == sorted(progress) and any(5 < p < 95 for p in progress), progress
    assert any("crops" in j.get("message", "") for j in seen)
    result = requests.get(f"{job_url}/results", params={"f": "json"}, timeout=10).json()
    assert service.local(result["mask"]).parent == service.output_dir / "async"
    assert result["missing_percentage"] > 0


def test_cancel_and_the_bound_on_concurrent_jobs(service: Service) -> None:
    """One inference slot: the second job waits (accepted) while the first runs; DELETE
    stops the first between batches and leaves no output; then the second runs."""

    def submit(product: Path, resolution: int, output: str) -> str:
        return submit_async(
            service.url,
            {
                "product": str(product),
                "resolution": resolution,
                "output": output,
                "overwrite": True,
            },
        )

    first = submit(T29UNU, 10, "cancelled")
    _poll(service, first, {"running"}, timeout=120)
    second = submit(T22HBD, 60, "after")
    time.sleep(1.5)
    waiting = requests.get(second, timeout=10).json()
    assert waiting["status"] == "accepted", waiting
    assert "waiting for a free inference slot" in waiting["message"]
    assert requests.get(first, timeout=10).json()["status"] == "running"
    response = requests.delete(first, timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "dismissed"
    assert _poll(service, second, {"successful", "failed"})[-1]["status"] == "successful"
    # polling a dismissed job says so (OGC status), and logs no traceback
    polled = requests.get(first, timeout=10)
    assert polled.status_code == 200 and polled.json()["status"] == "dismissed", polled.text
    assert requests.delete(first, timeout=10).json()["status"] == "dismissed"  # twice: fine
    # the cancelled job left nothing, not even its staging folder or its output folder
    deadline = time.monotonic() + 60
    cancelled = service.output_dir / "cancelled"
    while cancelled.exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not cancelled.exists()
    assert requests.get(first, timeout=10).json()["status"] == "dismissed"
    log = service.log.read_text()
    assert "job cancelled" in log and "Traceback" not in log
    assert "unknown locale" not in log.lower()


def test_owslib_client(service: Service) -> None:
    """OWSLib, an OGC API client written elsewhere: list, describe, execute sync, open
    every file the result names."""
    from owslib.ogcapi.processes import Processes

    api = Processes(service.url, headers={"Accept": "application/json"})
    assert "kappamask" in [p["id"] for p in api.processes()]
    assert api.process("kappamask")["jobControlOptions"] == ["sync-execute", "async-execute"]
    inputs = {"product": str(T22HBD), "resolution": 60, "output": "owslib"}
    result = api.execute("kappamask", inputs=inputs, response="raw")
    assert result["item"].endswith("_KAPPAMASK.json") and not result["reused"]
    # the client can open every file the result names, as from another machine: over HTTP,
    # and the COGs in place through GDAL's /vsicurl/ (range requests)
    for key in ASSET_KEYS:
        answer = requests.get(result[key], timeout=30)
        assert answer.status_code == 200, (key, answer.text[:200])
        assert answer.content == service.local(result[key]).read_bytes()
    item = requests.get(result["item"], timeout=30).json()
    assert {a["href"] for a in item["assets"].values()} == {result[k] for k in ASSETS}
    assert next(link["href"] for link in item["links"] if link["rel"] == "self") == result["item"]
    with (
        rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"),
        rasterio.open(f"/vsicurl/{result['mask']}") as remote,
        rasterio.open(service.local(result["mask"])) as local,
    ):
        assert (remote.read(1) == local.read(1)).all()
        assert (remote.read(1, out_shape=(10, 10)) == local.read(1, out_shape=(10, 10))).all()
    again = api.execute("kappamask", inputs=inputs, response="raw")
    assert again["reused"] and again["item"] == result["item"]
    # async execution, polling and results by the links: tests/test_ogc.py


def test_s3_in_and_out_over_http_without_leaking_credentials(
    service: Service, s3_server: S3Server
) -> None:
    response = service.execute(
        {
            "inputs": {
                "product": f"s3://products/zips/{T29UNU.stem}.zip",
                "resolution": 60,
                "output": "s3://results/http",
            }
        }
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["item"].startswith("s3://results/http/")
    assert [k.rsplit("/", 1)[-1] for k in s3_server.keys("results", "http/")] == sorted(
        result[k].rsplit("/", 1)[-1] for k in ASSET_KEYS
    )
    jobs = requests.get(f"{service.url}/jobs", params={"limit": 1000}, timeout=10).text
    for text in (response.text, jobs, service.log.read_text(), service.jobs_db.read_text()):
        assert S3_SECRET not in text


def _async_failure(url: str, inputs: dict[str, Any]) -> str:
    """Submit an async job; the message it failed with."""
    job_url = submit_async(url, inputs)
    deadline = time.monotonic() + 120
    while (job := requests.get(job_url, timeout=10).json())["status"] in (
        "accepted",
        "running",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "failed", job
    return str(job["message"])


@pytest.mark.slow
def test_external_triton_down_is_a_503_and_not_ready(tmp_path: Path) -> None:
    """An external Triton (--triton-url) that stops after the service started, or is down
    when it starts: the service keeps answering, /health/ready says 503, executions answer
    503 naming Triton, async jobs fail as the server's fault (NoApplicableCode)."""
    triton = LocalTriton(DEFAULT_REPOSITORY, supervise=False).__enter__()
    dead = f"127.0.0.1:{free_port()}"
    procs = []
    try:
        urls = []
        for name, triton_url in (("up", triton.http_url), ("down", dead)):
            port = free_port()
            log = tmp_path / f"{name}.log"
            procs.append(
                start_serve(
                    [
                        "--port",
                        str(port),
                        "--triton-url",
                        triton_url,
                        "--output-dir",
                        str(tmp_path / name),
                        "--data-root",
                        str(DATA),
                    ],
                    log,
                    {
                        "KAPPAMASK_JOB_OUTPUT_DIR": str(tmp_path / name / "jobs"),
                        "KAPPAMASK_JOBS_DB": str(tmp_path / f"{name}.db"),
                    },
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
            wait_for(urls[-1], procs[-1], log)
        assert requests.get(f"{urls[0]}/health/ready", timeout=10).status_code == 200
        triton.stop()
        for url in urls:
            assert requests.get(f"{url}/health", timeout=10).status_code == 200
            ready = requests.get(f"{url}/health/ready", timeout=10)
            assert ready.status_code == 503 and "Triton" in ready.json()["reason"]
            response = requests.post(
                f"{url}/processes/kappamask/execution",
                json={"inputs": {"product": str(T29UNU), "resolution": 60}},
                timeout=300,
            )
            assert response.status_code == 503, response.text
            assert "Triton" in response.json()["description"]
            message = _async_failure(url, {"product": str(T29UNU), "resolution": 60})
            assert message.startswith("NoApplicableCode: ") and "Triton" in message, message
        # the client's mistake stays the client's, asynchronously too
        message = _async_failure(urls[0], {"product": str(DATA / "s2" / "nope.SAFE")})
        assert message.startswith("InvalidParameterValue: ") and "does not exist" in message
    finally:
        triton.stop()
        for proc in procs:
            stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signal_to_send", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"]
)
def test_stopping_the_service_stops_its_local_triton(
    tmp_path: Path, signal_to_send: signal.Signals
) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    proc = start_serve(
        ["--port", str(port), "--output-dir", str(tmp_path / "out"), "--data-root", str(DATA)],
        log_path,
        {
            "KAPPAMASK_JOB_OUTPUT_DIR": str(tmp_path / "jobs"),
            "KAPPAMASK_JOBS_DB": str(tmp_path / "jobs.db"),
        },
    )
    deadline = time.monotonic() + 90
    while "KappaMask service on" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.3)
    port_of_triton = triton_port(log_path)
    assert len(tritonservers_on(port_of_triton)) == 1
    group = process_group(tritonservers_on(port_of_triton)[0])
    assert len(group) >= 2  # tritonserver and its Python backend stubs
    stop(proc, signal_to_send)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in group) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert [p for p in group if alive(p)] == []  # the server and its stubs
    if signal_to_send == signal.SIGINT:  # a clean stop leaves no Triton log in /tmp
        log = Path(tempfile.gettempdir()) / f"kappamask-triton-{port_of_triton}.log"
        assert not log.exists()
