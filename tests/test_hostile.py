"""The probe's findings against the running service (issue "Security first"): `kappamask
serve` over real HTTP with a real tritonserver, hostile clients on real sockets, local
HTTP servers that redirect or never stop talking, real FIFOs, symlinks and full or
read-only file systems. Every answer must be JSON, 4xx for the client's mistakes, 5xx only
for the server's own faults, never naming a server path; nothing is written outside the
output root, no refused host is contacted and no thread is held."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kappamask.inference.server import LocalTriton, free_port

from .conftest import DATA, T29UNU, earth_search_item, small_file_system
from .processes import service_args, start_serve, stop, submit_async, wait_for

#: Seconds a request body may take here (KAPPAMASK_READ_TIMEOUT_S of the service).
READ_TIMEOUT_S = 2


@dataclass
class Hostile:
    """The service under attack, and what an attacker would like it to touch."""

    url: str
    output_dir: Path
    scratch: Path  # a data root the tests put hostile products in
    outside: Path  # a folder outside every root: nothing may ever appear there
    log: Path
    #: A local HTTP server on an allowed host (127.0.0.1) serving what the tests put in
    #: ``routes``, and one on a refused host (localhost) that must never be contacted.
    web: Any
    refused: Any

    def execute(self, body: Any, timeout: float = 120) -> requests.Response:
        return requests.post(
            f"{self.url}/processes/kappamask/execution", json=body, timeout=timeout
        )

    def local(self, href: str) -> Path:
        prefix = "/outputs/"
        return self.output_dir / unquote(href.split(prefix, 1)[1])


class _Web:
    """A real HTTP server recording what it was asked, answering from ``routes``
    (path -> (status, headers, body or a callable writing to the socket))."""

    def __init__(self, host: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes: dict[str, tuple[int, dict[str, str], Any]] = {}
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append(self.path)
                status, headers, body = outer.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if callable(body):
                    self.end_headers()
                    body(self.wfile)
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://{host}:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hostile(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """`kappamask serve` allowing only the host 127.0.0.1 (private addresses allowed, so a
    local server can play a public STAC host), one inference slot, a 2 s read timeout."""
    base = tmp_path_factory.mktemp("hostile")
    scratch, outside = base / "scratch", base / "outside"
    scratch.mkdir()
    outside.mkdir()
    port = free_port()
    web, refused = _Web("127.0.0.1"), _Web("localhost")
    env = {
        **os.environ,
        "KAPPAMASK_JOB_OUTPUT_DIR": str(base / "out" / ".jobs"),
        "KAPPAMASK_JOBS_DB": str(base / "out" / ".jobs" / "jobs.db"),
        "KAPPAMASK_MAX_CONCURRENT_JOBS": "1",
        "KAPPAMASK_ALLOWED_HOSTS": "127.0.0.1",
        "KAPPAMASK_ALLOW_PRIVATE_NETWORKS": "true",
        "KAPPAMASK_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
    }
    # S3 that cannot be reached: assets there are the storage's fault
    env.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_REGION": "us-east-1",
        }
    )
    log_path = base / "serve.log"
    args = ["--port", str(port), *service_args(triton.http_url, base / "out", DATA, scratch)]
    proc = start_serve(args, log_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, proc, log_path)
        yield Hostile(url, base / "out", scratch, outside, log_path, web, refused)
    finally:
        stop(proc)
        web.close()
        refused.close()


def _is_json_error(response: requests.Response) -> dict[str, Any]:
    assert response.headers.get("Content-Type", "").startswith("application/json"), (
        response.status_code,
        response.text[:300],
    )
    body = response.json()
    assert isinstance(body.get("description"), str), body
    return dict(body)


def _written_outside(hostile: Hostile) -> list[Path]:
    return [p for p in hostile.outside.rglob("*")]


# --- 1. arbitrary file write -----------------------------------------------------------------


def test_product_ids_never_become_paths(hostile: Hostile) -> None:
    target = hostile.outside / "NAME"
    item_abs = earth_search_item(id=str(target))
    item_abs["properties"].pop("sentinel:product_id")
    item_rel = earth_search_item(properties={"sentinel:product_id": "../../outside/x"})
    hostile.web.routes["/item.json"] = (200, {}, json.dumps(item_abs).encode())
    safe = hostile.scratch / "absolute-uri" / T29UNU.name
    shutil.copytree(T29UNU, safe)
    mtd = safe / "MTD_MSIL2A.xml"
    uri = mtd.read_text().split("<PRODUCT_URI>")[1].split("</PRODUCT_URI>")[0]
    mtd.write_text(mtd.read_text().replace(uri, f"{target}.SAFE"))
    for product in (item_abs, item_rel, f"{hostile.web.base}/item.json", str(safe)):
        response = hostile.execute({"inputs": {"product": product, "resolution": 60}})
        assert response.status_code == 400, response.text
        assert "is not a Sentinel-2 product name" in _is_json_error(response)["description"]
    assert _written_outside(hostile) == []
    staging = [p for p in hostile.output_dir.iterdir() if p.name.startswith(".kappamask")]
    assert staging == []


@pytest.mark.parametrize(
    ("output", "status", "says"),
    [
        (".jobs", 403, "names a hidden folder (.jobs)"),
        ("a/.jobs", 403, "names a hidden folder"),
        ("../escape", 403, "../escape is outside the output roots"),
    ],
)
def test_outputs_stay_out_of_the_service_s_state(
    hostile: Hostile, output: str, status: int, says: str
) -> None:
    response = hostile.execute(
        {"inputs": {"product": str(T29UNU), "resolution": 60, "output": output}}
    )
    assert response.status_code == status, response.text
    description = _is_json_error(response)["description"]
    assert says in description and str(hostile.output_dir) not in description


# --- 2. redirects of asset hrefs ---------------------------------------------------------------


def test_an_asset_redirected_to_a_refused_host_is_never_fetched(hostile: Hostile) -> None:
    item = earth_search_item()
    for key, asset in item["assets"].items():
        asset["href"] = f"{hostile.web.base}/assets/{key}.tif"
        hostile.web.routes[f"/assets/{key}.tif"] = (
            302,
            {"Location": f"{hostile.refused.base}/{key}.tif"},
            b"",
        )
    response = hostile.execute({"inputs": {"product": item, "resolution": 60}})
    assert response.status_code == 403, response.text
    assert "led to host localhost" in _is_json_error(response)["description"]
    assert any(p.startswith("/assets/") for p in hostile.web.seen)
    assert hostile.refused.seen == []


# --- 3. bodies that would hang a thread -----------------------------------------------------------


def _raw(hostile: Hostile, data: bytes, wait: float = 10) -> tuple[str, float]:
    """Send raw bytes and stall; the status line answered and after how long."""
    host, port = hostile.url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as conn:
        conn.sendall(data)
        try:
            answer = conn.recv(4096).decode(errors="replace")
        except TimeoutError:
            answer = "(no answer)"
    return answer.split("\r\n")[0], time.monotonic() - started


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (
            b"POST /processes/kappamask/execution HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "400",
        ),
        (b"POST /processes/kappamask/execution HTTP/1.1\r\nHost: a\r\n\r\n", "400"),
        (
            b"POST /processes/kappamask/execution HTTP/1.1\r\nHost: a\r\n"
            b'Content-Length: 500\r\n\r\n{"inputs": ',
            "408",
        ),
        (b"POST /processes/kappamask/execution HTTP/1.1\r\nHost: a\r\n", ""),  # half a head
        (b"", ""),  # connects and says nothing
    ],
    ids=["empty", "no length", "short", "half a head", "silent"],
)
def test_no_request_holds_a_thread(hostile: Hostile, data: bytes, status: str) -> None:
    clients = [threading.Thread(target=_raw, args=(hostile, data, 30)) for _ in range(8)]
    for client in clients:  # more stalled clients than the API has slots
        client.start()
    line, seconds = _raw(hostile, data, 30)
    if status:
        assert line.split()[1] == status, line
    assert seconds < READ_TIMEOUT_S + 3, (line, seconds)  # answered or closed, not held
    assert requests.get(f"{hostile.url}/processes", timeout=10).status_code == 200
    for client in clients:
        client.join(30)


# --- 4. client mistakes are never 500 -----------------------------------------------------------


def _probe_cases(hostile: Hostile) -> list[tuple[str, Any]]:
    loop = hostile.scratch / "loop.SAFE"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    empty_assets = earth_search_item(assets={})
    p = str(T29UNU)
    return [
        ("bbox too large for a float", {"inputs": {"product": p, "bbox": [10**400, 0, 1, 1]}}),
        (
            "aoi too large for a float",
            {
                "inputs": {
                    "product": p,
                    "aoi": {
                        "type": "Polygon",
                        "coordinates": [[[0, 0], [10**400, 0], [1, 1], [0, 0]]],
                    },
                }
            },
        ),
        ("lone surrogate", {"inputs": {"product": "\ud800"}}),
        ("lone surrogate in an item", {"inputs": {"product": earth_search_item(id="S2\udfff")}}),
        ("NUL in a string", {"inputs": {"product": "a\x00b"}}),
        ("NUL in a key", {"inputs": {"product": p, "a\x00": 1}}),
        ("symlink loop", {"inputs": {"product": str(loop)}}),
        ("STAC item with empty assets", {"inputs": {"product": empty_assets}}),
        (
            "proj:epsg not a number",
            {"inputs": {"product": earth_search_item(properties={"proj:epsg": "abc"})}},
        ),
        (
            "sun elevation not a number",
            {"inputs": {"product": earth_search_item(properties={"view:sun_elevation": "high"})}},
        ),
        ("raster scale not a number", {"inputs": {"product": _scaled_item("x")}}),
        (
            "junk geometry",
            {
                "inputs": {
                    "product": earth_search_item(geometry={"type": "Polygon", "coordinates": 5})
                }
            },
        ),
        ("geometry a number", {"inputs": {"product": earth_search_item(geometry=7)}}),
        ("properties null", {"inputs": {"product": {**earth_search_item(), "properties": None}}}),
        ("subscriber a number", {"inputs": {"product": p}, "subscriber": 5}),
        ("subscriber a string", {"inputs": {"product": p}, "subscriber": "http://x"}),
        (
            "subscriber failedUri only",
            {"inputs": {"product": p}, "subscriber": {"failedUri": "http://127.0.0.1:9/x"}},
        ),
        ("subscriber URL a list", {"inputs": {"product": p}, "subscriber": {"successUri": [1]}}),
        ("inputs a list", {"inputs": [1, 2]}),
        ("inputs a string", {"inputs": "x"}),
        ("response unknown", {"inputs": {"product": p}, "response": "everything"}),
        ("outputs a number", {"inputs": {"product": p}, "outputs": 3}),
        ("nan buffer", {"inputs": {"product": p, "cloud_buffer": math.nan}}),
        ("infinite buffer", {"inputs": {"product": p, "cloud_buffer": math.inf}}),
        ("huge resolution", {"inputs": {"product": p, "resolution": 10**400}}),
        ("bool resolution", {"inputs": {"product": p, "resolution": True}}),
        ("level a list", {"inputs": {"product": p, "level": ["L1C"]}}),
        ("model a dict", {"inputs": {"product": p, "model": {"name": "x"}}}),
        ("bbox strings", {"inputs": {"product": p, "bbox": ["a", "b", "c", "d"]}}),
        ("bbox object of junk", {"inputs": {"product": p, "bbox": {"bbox": 5, "crs": 7}}}),
        (
            "aoi feature of a point",
            {
                "inputs": {
                    "product": p,
                    "aoi": {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": [0, 0]},
                    },
                }
            },
        ),
        (
            "aoi rings of junk",
            {"inputs": {"product": p, "aoi": {"type": "MultiPolygon", "coordinates": [[[["a"]]]]}}},
        ),
        ("product a number", {"inputs": {"product": 5}}),
        ("product a list", {"inputs": {"product": [str(T29UNU)]}}),
        (
            "product item URL of a port past 65535",
            {"inputs": {"product": "http://127.0.0.1:99999/item.json"}},
        ),
        ("product a device", {"inputs": {"product": "/dev/zero"}}),
        (
            "STAC item with a relative asset and no self link",
            {"inputs": {"product": earth_search_item(assets={"B04": {"href": "B04.tif"}})}},
        ),
        (
            "STAC item with a huge gsd",
            {"inputs": {"product": earth_search_item(assets={"B04": {"href": "x", "gsd": 1e300}})}},
        ),
    ]


def _scaled_item(scale: Any) -> dict[str, Any]:
    item = earth_search_item()
    for asset in item["assets"].values():
        asset["raster:bands"] = [{"scale": scale}]
    return item


def test_the_probe_s_inputs_are_4xx_json(hostile: Hostile) -> None:
    for row, body in _probe_cases(hostile):
        raw = json.dumps(body)  # NaN, Infinity and huge integers as Python writes them
        response = requests.post(
            f"{hostile.url}/processes/kappamask/execution",
            data=raw,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert 400 <= response.status_code < 500 or response.status_code == 502, (
            row,
            response.status_code,
            response.text[:300],
        )
        description = _is_json_error(response)["description"]
        assert "Traceback" not in description and str(hostile.output_dir) not in description
    assert _written_outside(hostile) == []


def test_methods_an_endpoint_does_not_take_are_405_json(hostile: Hostile) -> None:
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        response = requests.request(
            method, f"{hostile.url}/processes/kappamask/execution", timeout=10
        )
        assert response.status_code == 405 and response.headers["Allow"] == "POST"
        _is_json_error(response)
    for path in ("/nope", "/processes/nope", "/jobs/nope", "/jobs/nope/results"):
        response = requests.get(f"{hostile.url}{path}", params={"f": "json"}, timeout=10)
        assert response.status_code == 404, (path, response.text[:200])
        _is_json_error(response)


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([10**400, -(10**400), 1e308, -0.0, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "\ud800",
            "a\x00b",
            "../../x",
            "/etc/passwd",
            "..",
            ".jobs",
            "",
            " ",
            "file:///etc/passwd",
            "http://169.254.169.254/latest",
            "s3://",
            "s3://b",
            "http://127.0.0.1:1/x.json",
            "\u202e",
            "x" * 3000,
            "L1C",
            "auto",
            "lanczos",
        ]
    ),
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=12), inner, max_size=5),
    ),
    max_leaves=20,
)
_GEOMETRY = st.fixed_dictionaries(
    {"type": st.sampled_from(["Polygon", "MultiPolygon", "Feature", "FeatureCollection", "Point"])},
    optional={"coordinates": _JSON, "geometry": _JSON, "features": _JSON},
)


def _input_values(name: str) -> st.SearchStrategy[Any]:
    """Values for one input of the process: valid ones, near misses and junk."""
    good = {
        "level": st.sampled_from(["auto", "L1C", "L2A"]),
        "resolution": st.sampled_from([10, 20, 60]),
        "resampling": st.sampled_from(["lanczos", "bilinear"]),
        "bbox": st.lists(st.floats(-200, 200), min_size=4, max_size=4),
        "aoi": _GEOMETRY,
        "cloud_buffer": st.floats(-10, 2000),
        "shadow_buffer": st.floats(-10, 2000),
        "overwrite": st.booleans(),
        "model": st.sampled_from(["kappamask_l1c", "kappamask_l2a:x", "a/b"]),
    }.get(name, st.nothing())
    return st.one_of(good, _JSON)


@pytest.fixture(scope="module")
def process_inputs(hostile: Hostile) -> list[str]:
    return sorted(requests.get(f"{hostile.url}/processes/kappamask", timeout=10).json()["inputs"])


def _items() -> st.SearchStrategy[Any]:
    """STAC items with one field replaced by junk."""
    fields = st.sampled_from(
        [
            "id",
            "geometry",
            "bbox",
            "properties",
            "assets",
            "links",
            "stac_extensions",
            "type",
            "collection",
        ]
    )
    props = st.sampled_from(
        [
            "proj:epsg",
            "proj:code",
            "view:sun_elevation",
            "view:sun_azimuth",
            "datetime",
            "s2:processing_baseline",
            "platform",
            "sentinel:product_id",
            "s2:mean_solar_zenith",
        ]
    )

    def mutate(where: str, field: str, prop: str, value: Any) -> dict[str, Any]:
        item = earth_search_item()
        if where == "top":
            item[field] = value
        elif where == "property":
            item["properties"][prop] = value
        else:
            asset = next(iter(item["assets"].values()))
            asset[prop if prop.startswith("proj") else "raster:bands"] = value
        return item

    return st.builds(mutate, st.sampled_from(["top", "property", "asset"]), fields, props, _JSON)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_execute_request_is_answered_as_json_without_a_500(
    hostile: Hostile, process_inputs: list[str], data: st.DataObject
) -> None:
    """Property: whatever the inputs (drawn from the process's own input names, valid
    values, near misses and junk), the answer is JSON, never a 5xx but the storage's 502,
    within a bound, and the service still answers. The output is a folder outside the
    roots unless the draw names one, so no draw runs the model."""
    names = data.draw(
        st.lists(st.sampled_from([*process_inputs, "colour"]), max_size=5, unique=True)
    )
    inputs = {name: data.draw(_input_values(name)) for name in names}
    inputs["product"] = data.draw(
        st.one_of(st.sampled_from([str(T29UNU), str(DATA / "nope")]), _items(), _JSON)
    )
    inputs.setdefault("output", "/kappamask-no-such-root/x")
    body: dict[str, Any] = {"inputs": inputs}
    if data.draw(st.booleans()):
        body["subscriber"] = data.draw(
            st.one_of(
                _JSON,
                st.fixed_dictionaries(
                    {}, optional={k: _JSON for k in ("successUri", "inProgressUri", "failedUri")}
                ),
            )
        )
    if data.draw(st.booleans()):
        body["response"] = data.draw(st.one_of(st.sampled_from(["raw", "document"]), _JSON))
    started = time.monotonic()
    response = requests.post(
        f"{hostile.url}/processes/kappamask/execution",
        data=json.dumps(body),
        timeout=120,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code < 500 or response.status_code == 502, (
        body,
        response.status_code,
        response.text[:300],
    )
    if response.status_code >= 400:
        _is_json_error(response)
    else:
        assert isinstance(response.json(), dict)
    assert time.monotonic() - started < 60
    assert _written_outside(hostile) == []


# --- 5, 6. the whole product inside the roots; special files --------------------------------------


def test_metadata_linked_outside_the_roots_is_refused(hostile: Hostile) -> None:
    safe = hostile.scratch / "linked-mtd" / T29UNU.name
    shutil.copytree(T29UNU, safe)
    secret = hostile.outside.parent / "MTD_MSIL2A.xml"
    shutil.move(safe / "MTD_MSIL2A.xml", secret)
    (safe / "MTD_MSIL2A.xml").symlink_to(secret)
    response = hostile.execute({"inputs": {"product": str(safe), "resolution": 60}})
    assert response.status_code == 403, response.text
    assert "outside the data roots" in _is_json_error(response)["description"]


def test_a_fifo_is_refused_and_holds_no_slot(hostile: Hostile) -> None:
    fifo = hostile.scratch / "X.SAFE"
    if not fifo.exists():
        os.mkfifo(fifo)
    inside = hostile.scratch / "fifo-mtd" / T29UNU.name
    shutil.copytree(T29UNU, inside)
    (inside / "MTD_MSIL2A.xml").unlink()
    os.mkfifo(inside / "MTD_MSIL2A.xml")
    for product in (fifo, inside):
        response = hostile.execute({"inputs": {"product": str(product)}}, timeout=30)
        assert response.status_code == 400, response.text
        assert "not a regular file or folder" in _is_json_error(response)["description"]
    # the one inference slot is free: a real job runs
    response = hostile.execute(
        {"inputs": {"product": str(T29UNU), "resolution": 60, "output": "after-fifo"}}, timeout=300
    )
    assert response.status_code == 200, response.text


# --- 7. dismissal -------------------------------------------------------------------------------


def _finished_job(hostile: Hostile, output: str) -> tuple[str, dict[str, Any]]:
    job_url = submit_async(
        hostile.url, {"product": str(T29UNU), "resolution": 60, "output": output, "overwrite": True}
    )
    deadline = time.monotonic() + 300
    while (job := requests.get(job_url, timeout=10).json())["status"] not in (
        "successful",
        "failed",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "successful", job
    return job_url, requests.get(f"{job_url}/results", params={"f": "json"}, timeout=10).json()


def test_dismissing_a_finished_job_deletes_its_outputs(hostile: Hostile) -> None:
    job_url, result = _finished_job(hostile, "dismissed")
    hrefs = [result[k] for k in ("mask", "confidence", "probability", "valid", "preview", "item")]
    assert all(requests.get(h, timeout=10).status_code == 200 for h in hrefs)
    response = requests.delete(job_url, timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "dismissed"
    for href in hrefs:
        assert not hostile.local(href).exists()
        assert requests.get(href, timeout=10).status_code == 404
    results = requests.get(f"{job_url}/results", params={"f": "json"}, timeout=10)
    assert results.status_code == 410, results.text
    assert "dismissed" in _is_json_error(results)["description"]
    assert requests.get(job_url, timeout=10).json()["status"] == "dismissed"


def test_dismissal_races_no_reader_into_a_500_or_a_404(hostile: Hostile) -> None:
    job_url, _result = _finished_job(hostile, "raced")
    seen: list[tuple[str, int]] = []
    stop_at = time.monotonic() + 3

    def read(path: str) -> None:
        while time.monotonic() < stop_at:
            answer = requests.get(f"{job_url}{path}", params={"f": "json"}, timeout=10)
            seen.append((path, answer.status_code))
            assert answer.headers["Content-Type"].startswith("application/json")

    readers = [threading.Thread(target=read, args=(p,)) for p in ("", "/results", "/results")]
    for reader in readers:
        reader.start()
    time.sleep(0.3)
    assert requests.delete(job_url, timeout=30).status_code == 200
    for reader in readers:
        reader.join(30)
    assert {s for p, s in seen if p == ""} <= {200}  # the job never vanishes
    assert {s for p, s in seen if p == "/results"} <= {200, 410}
    assert ("/results", 410) in seen


def test_a_running_job_being_dismissed_is_never_missing(hostile: Hostile) -> None:
    inputs = {"product": str(T29UNU), "resolution": 20, "output": "running-dismissed"}
    job_url = submit_async(hostile.url, {**inputs, "overwrite": True})
    deadline = time.monotonic() + 120
    while requests.get(job_url, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    statuses: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            statuses.append(requests.get(job_url, timeout=10).status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    assert requests.delete(job_url, timeout=30).status_code == 200
    time.sleep(1)
    done.set()
    poller.join(30)
    assert statuses and set(statuses) == {200}


# --- 8. storage faults ----------------------------------------------------------------------------


@pytest.fixture
def mounted(hostile: Hostile) -> Iterator[Path]:
    """A 1 MiB file system inside the service's output folder."""
    with small_file_system(hostile.output_dir / f"disk{time.monotonic_ns()}") as mount:
        yield mount


def test_a_full_disk_is_507_and_a_read_only_one_503(hostile: Hostile, mounted: Path) -> None:
    inputs = {"product": str(T29UNU), "resolution": 60, "output": mounted.name, "overwrite": True}
    response = hostile.execute({"inputs": inputs}, timeout=300)
    assert response.status_code == 507, response.text
    description = _is_json_error(response)["description"]
    assert "full" in description and str(hostile.output_dir) not in description
    assert list(mounted.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)
    response = hostile.execute({"inputs": inputs}, timeout=300)
    assert response.status_code == 503, response.text
    description = _is_json_error(response)["description"]
    assert "Read-only" in description and str(hostile.output_dir) not in description


# --- 9. smaller -----------------------------------------------------------------------------------


def test_a_huge_item_is_refused_while_streaming(hostile: Hostile) -> None:
    sent = {"bytes": 0}

    def endless(out: Any) -> None:
        chunk = b" " * 65536
        try:
            while sent["bytes"] < 64 * 2**20:
                out.write(chunk)
                sent["bytes"] += len(chunk)
        except OSError:
            pass

    hostile.web.routes["/huge.json"] = (200, {"Content-Type": "application/json"}, endless)
    response = hostile.execute({"inputs": {"product": f"{hostile.web.base}/huge.json"}})
    assert response.status_code == 422, response.text
    assert "larger than" in _is_json_error(response)["description"]
    assert sent["bytes"] < 32 * 2**20  # cut off, not read whole


def test_unreachable_s3_assets_are_the_storage_s_fault(hostile: Hostile) -> None:
    """Assets on S3 whose endpoint does not answer: 502, not the product's 422."""
    item = earth_search_item()
    for key, asset in item["assets"].items():
        asset["href"] = f"s3://kappamask-no-such-bucket/{key}.tif"
    response = hostile.execute({"inputs": {"product": item, "resolution": 60}}, timeout=300)
    assert response.status_code == 502, response.text
    _is_json_error(response)


def test_after_all_that_the_service_still_answers(hostile: Hostile) -> None:
    assert requests.get(f"{hostile.url}/health", timeout=10).status_code == 200
    assert "failed on an internal error" not in hostile.log.read_text()
    assert _written_outside(hostile) == []
