"""Fast layer (no Triton): the probe's findings (issue "Security first"), each against the
part that must stop it, with real files, real sockets and real local HTTP servers. The
same findings over the running service are in tests/test_hostile.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import requests
from rasterio.env import get_gdal_config
from werkzeug.serving import make_server

from kappamask.access import MAX_PRODUCT_ID, AccessPolicy, product_name
from kappamask.api.guard import RequestGuard
from kappamask.errors import (
    AccessDeniedError,
    InvalidInputError,
    KappaMaskError,
    OutputStorageError,
    ProductError,
    StorageError,
    StorageFullError,
)
from kappamask.geometry.grid import output_grid
from kappamask.sources import open_product
from kappamask.sources.stac import MAX_ITEM_BYTES, fetch_item
from kappamask.storage.sinks import LocalSink, OutputTarget, delete_published

from .conftest import T29UNU, earth_search_item, small_file_system

# --- 1. names that reach a path ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "/some/absolute/dir/NAME",
        "../x",
        "a/../../b",
        "x/y",
        "..",
        ".hidden",
        "-rf",
        "a\x00b",
        "S2A_MSIL2A_\u00e9t\u00e9",  # unicode
        "S2A\u202eFIG",  # a right-to-left override
        "x" * (MAX_PRODUCT_ID + 1),
        "",
        "a..b",
        "C:\\Windows\\x",
    ],
)
def test_names_that_are_not_product_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="input 'product'") as info:
        product_name(bad)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "good",
    [
        "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454",  # ESA
        "S2B_27VWK_20240206_0_L1C",  # Earth Search v1
        "S2B_MSIL2A_20190629T212529_R043_T06VVN_20201004T020112",  # Planetary Computer
        "S2A_MSIL1C_20170105T013442_N0204_R031_T53NMJ_20170105T013443.SAFE.v2",
    ],
)
def test_product_names_of_every_catalog_are_accepted(good: str) -> None:
    assert product_name(good) == good


@pytest.mark.parametrize("field", ["id", "sentinel:product_id"])
@pytest.mark.parametrize("bad", ["/tmp/kappamask-probe/NAME", "../x", "x\x00y"])
def test_a_stac_item_cannot_name_a_path(field: str, bad: str) -> None:
    item = earth_search_item()
    if field == "id":
        item["properties"].pop("sentinel:product_id")
        item["id"] = bad
    else:
        item["properties"][field] = bad
    with pytest.raises(InvalidInputError, match="is not a Sentinel-2 product name"):
        open_product(item)


def test_a_safe_whose_metadata_names_a_path_is_refused(tmp_path: Path) -> None:
    safe = tmp_path / T29UNU.name
    shutil.copytree(T29UNU, safe)
    mtd = safe / "MTD_MSIL2A.xml"
    text = mtd.read_text()
    uri = text.split("<PRODUCT_URI>")[1].split("</PRODUCT_URI>")[0]
    mtd.write_text(text.replace(uri, "/tmp/kappamask-probe/NAME.SAFE"))
    with pytest.raises(InvalidInputError, match="is not a Sentinel-2 product name"):
        open_product(str(safe))


def test_sinks_write_nothing_outside_their_folder(tmp_path: Path) -> None:
    with LocalSink(tmp_path / "out") as sink:
        for name in ("../x.tif", "/etc/x", "a/b.tif", "..", ".jobs"):
            with pytest.raises(AccessDeniedError, match="outside the output folder"):
                sink.path(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing, not even out/


def test_output_folders_are_named_as_the_client_gave_them(tmp_path: Path) -> None:
    base = tmp_path / "server-private-outputs"
    policy = AccessPolicy(data_roots=(tmp_path,), output_roots=(base,))
    with pytest.raises(AccessDeniedError) as info:
        OutputTarget("../escape", policy, base).open()
    assert "../escape is outside the output roots" in str(info.value)
    assert "server-private-outputs" not in str(info.value)
    for hidden in (".jobs", "a/.kappamask-staging-1@h.2", "./.jobs/x"):
        with pytest.raises(AccessDeniedError, match="names a hidden folder"):
            OutputTarget(hidden, policy, base).open()
    assert not base.exists()


# --- 2. every hop of GDAL's HTTP through the policy ------------------------------------------


class _Server:
    """A real HTTP server on 127.0.0.1 that records the paths asked and answers by a
    table of path -> (status, headers, body)."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, head_only: bool) -> None:
                outer.seen.append(self.path)
                status, headers, body = routes.get(self.path.split("?")[0], (404, {}, b""))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head_only:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer(False)

            def do_HEAD(self) -> None:
                self._answer(True)

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cog(tmp_path: Path) -> bytes:
    path = tmp_path / "b.tif"
    transform = rasterio.Affine(60, 0, 300000, 0, -60, 2000040)
    profile = {
        "driver": "GTiff",
        "width": 64,
        "height": 64,
        "count": 1,
        "dtype": "uint16",
        "crs": "EPSG:32628",
        "transform": transform,
    }
    with rasterio.open(path, "w", **profile) as out:
        out.write(np.full((1, 64, 64), 1000, np.uint16))
    return path.read_bytes()


def _local_item(port: int) -> dict[str, Any]:
    item = earth_search_item()
    for key, asset in item["assets"].items():
        asset["href"] = f"http://127.0.0.1:{port}/{key}.tif"
    return item


def test_a_band_redirected_to_a_refused_host_is_never_fetched(cog: bytes) -> None:
    """The assets' host is allowed, their redirect's host is not: GDAL's request for the
    redirect reaches the policy proxy, which refuses it; the refused host sees nothing."""
    refused = _Server({"/B01.tif": (200, {}, cog)})
    elsewhere = f"http://localhost:{refused.port}/B01.tif"  # localhost: not an allowed host
    item = earth_search_item()
    allowed = _Server(
        {f"/{key}.tif": (302, {"Location": elsewhere}, b"") for key in item["assets"]}
    )
    try:
        policy = AccessPolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=True)
        product = open_product(_local_item(allowed.port), policy)
        with pytest.raises(AccessDeniedError, match="led to host localhost"):
            output_grid(product, 60)
        assert allowed.seen  # asked, and answered with the redirect
        assert refused.seen == []  # never contacted
    finally:
        allowed.close()
        refused.close()


def test_the_policy_proxy_refuses_a_tunnel_to_a_refused_host() -> None:
    from kappamask.reading import egress

    target = _Server({"/": (200, {}, b"secret")})
    try:
        installed = egress.install(
            AccessPolicy(allowed_hosts=("example.org",), allow_private_networks=False)
        )
        proxy = get_gdal_config("GDAL_HTTP_PROXY")
        assert installed is not None and proxy == installed.address_text
        host, port = installed.address_text.split(":")
        requests_sent = (
            f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n",
            f"GET http://127.0.0.1:{target.port}/ HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        for request in requests_sent:
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(request.encode())
                answer = conn.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 403"), answer
        assert target.seen == []
        # and GDAL goes direct again once no policy is installed (no proxy named "None")
        egress.reset()
        assert get_gdal_config("GDAL_HTTP_PROXY", normalize=False) is None
    finally:
        target.close()


def test_an_unreachable_storage_is_the_storage_s_fault() -> None:
    """Band hrefs on S3 whose endpoint does not answer: 502, not the product's 422."""
    from kappamask.storage.s3 import S3Settings

    dead = f"http://127.0.0.1:{_free_port()}"
    policy = AccessPolicy(
        s3=S3Settings(
            endpoint_url=dead, access_key_id="k", secret_access_key="s", region="us-east-1"
        )
    )
    item = earth_search_item()
    for key, asset in item["assets"].items():
        asset["href"] = f"s3://bucket/{key}.tif"
    product = open_product(item, policy)
    with pytest.raises(StorageError, match="cannot be reached"):
        output_grid(product, 60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 3. bounded reads ------------------------------------------------------------------------


@pytest.fixture
def guarded() -> Iterator[str]:
    """The request guard in a real threaded werkzeug server, 1 s read timeout."""

    def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    app = RequestGuard(inner, lambda: True, read_timeout_s=1.0, job_status=lambda _j: None)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def _raw(address: str, head: str, body: bytes = b"", trickle: float = 0.0) -> tuple[str, float]:
    """Send a request, then its body (a byte each ``trickle`` s), and stall; the answer's
    status line and how long it took."""
    host, port = address.split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(head.encode())
        try:
            for i in range(len(body)):
                if trickle and time.monotonic() - started > 5:
                    break
                conn.sendall(body[i : i + 1] if trickle else body[i:])
                if not trickle:
                    break
                time.sleep(trickle)
        except OSError:  # the server stopped reading: its answer is waiting
            pass
        answer = conn.recv(4096).decode()
    return answer.split("\r\n")[0], time.monotonic() - started


@pytest.mark.parametrize(
    ("head", "body", "trickle", "status"),
    [
        ("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", b"", 0.0, "400"),
        ("POST /x HTTP/1.1\r\nHost: a\r\n\r\n", b"", 0.0, "400"),  # no length, no body
        ("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n", b'{"a": 1', 0.0, "408"),
        (
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n",
            b'{"a": "' + b"x" * 90,
            0.2,
            "408",
        ),
    ],
    ids=["empty", "no length", "short", "trickle"],
)
def test_empty_short_and_slow_bodies_end_within_the_read_timeout(
    guarded: str, head: str, body: bytes, trickle: float, status: str
) -> None:
    line, seconds = _raw(guarded, head, body, trickle)
    assert line.split()[1] == status, line
    assert seconds < 4  # the 1 s timeout, never the client's patience


def test_a_stac_item_url_is_capped_while_streaming() -> None:
    endless = _Server({"/item.json": (200, {}, b" " * (MAX_ITEM_BYTES + 10))})
    try:
        policy = AccessPolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=True)
        with pytest.raises(ProductError, match="larger than"):
            fetch_item(f"http://127.0.0.1:{endless.port}/item.json", policy)
    finally:
        endless.close()


def test_special_files_and_symlink_loops_are_refused_before_any_read(tmp_path: Path) -> None:
    fifo = tmp_path / "X.SAFE"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.SAFE"
    loop.symlink_to(loop)
    policy = AccessPolicy(data_roots=(tmp_path,), output_roots=(tmp_path / "o",))
    outcome: dict[str, Any] = {}

    def attempt(path: Path) -> None:
        try:
            open_product(str(path), policy)
        except KappaMaskError as err:
            outcome[path.name] = err

    for path in (fifo, loop, Path("/dev/zero")):
        thread = threading.Thread(target=attempt, args=(path,), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), f"{path} hangs"
    assert isinstance(outcome["X.SAFE"], InvalidInputError)
    assert "not a regular file or folder" in str(outcome["X.SAFE"])
    assert "symbolic link loop" in str(outcome["loop.SAFE"])
    assert isinstance(outcome["zero"], AccessDeniedError | InvalidInputError)


def test_metadata_linked_outside_the_data_roots_is_never_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    safe = root / T29UNU.name
    shutil.copytree(T29UNU, safe)
    outside = tmp_path / "secret.xml"
    shutil.copyfile(safe / "MTD_MSIL2A.xml", outside)
    (safe / "MTD_MSIL2A.xml").unlink()
    (safe / "MTD_MSIL2A.xml").symlink_to(outside)
    before = outside.stat().st_atime_ns
    os.utime(outside, ns=(before - 10**10, outside.stat().st_mtime_ns))
    policy = AccessPolicy(data_roots=(root,), output_roots=(tmp_path / "o",))
    with pytest.raises(AccessDeniedError, match="outside the data roots"):
        open_product(str(safe), policy)
    # and a FIFO in place of the metadata is refused, not waited on
    (safe / "MTD_MSIL2A.xml").unlink()
    os.mkfifo(safe / "MTD_MSIL2A.xml")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        open_product(str(safe), policy)


# --- 8. storage faults are the server's --------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_file_system(tmp_path / "small") as mount:
        yield mount


def test_a_full_disk_is_507_and_names_no_path(small_disk: Path) -> None:
    with pytest.raises(StorageFullError) as info, LocalSink(small_disk / "out") as sink:
        sink.path("big.bin").write_bytes(b"x" * 4 * 2**20)
    assert info.value.http_status == 507 and str(small_disk) not in str(info.value)
    # GDAL's writers fail without an errno ("Write failed"): the free space tells
    profile = {
        "driver": "GTiff",
        "width": 2048,
        "height": 2048,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:32628",
        "transform": rasterio.Affine(10, 0, 0, 0, -10, 0),
    }
    with pytest.raises(StorageFullError), LocalSink(small_disk / "out") as sink:
        noise = np.random.default_rng(0).integers(0, 255, (1, 2048, 2048), dtype=np.uint8)
        with rasterio.open(sink.path("m.tif"), "w", **profile) as out:
            out.write(noise)
    assert list(small_disk.iterdir()) == []  # nothing half-written


def test_a_read_only_output_is_503_and_names_no_path(small_disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OutputStorageError) as info, LocalSink(small_disk / "out"):
        pass
    assert info.value.http_status == 503 and "Read-only" in str(info.value)
    assert str(small_disk) not in str(info.value)


# --- 7. dismissal deletes what the job published -----------------------------------------------


def test_dismissal_deletes_only_the_job_s_own_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    names = [
        f"P_KAPPAMASK{s}"
        for s in (
            ".tif",
            "_CONFIDENCE.tif",
            "_PROBABILITY.tif",
            "_VALID.tif",
            "_PREVIEW.png",
            ".json",
        )
    ]
    for name in names:
        (out / "a" / name).write_bytes(b"x")
    (out / "a" / "other.tif").write_bytes(b"x")
    outside = tmp_path / "keep.tif"
    outside.write_bytes(b"x")
    url = "http://h/outputs"
    result = dict(
        zip(
            ("mask", "confidence", "probability", "valid", "preview", "item"),
            (f"{url}/a/{n}" for n in names),
            strict=True,
        )
    )
    policy = AccessPolicy(data_roots=(tmp_path,), output_roots=(out,))
    service = OutputTarget(out, policy, out, url)
    assert delete_published({**result, "reused": True}, service) == []
    hostile = {**result, "mask": f"{url}/../keep.tif", "item": str(outside)}
    delete_published(hostile, service)
    assert outside.exists()
    assert len(delete_published(result, service)) == 6
    assert [p.name for p in (out / "a").iterdir()] == ["other.tif"]
    # a batch: each product it made itself
    for name in names:
        (out / "a" / name).write_bytes(b"x")
    batch = {
        "collection": f"{url}/a/collection.json",
        "products": [
            {"item": f"{url}/a/P_KAPPAMASK.json", "status": "successful"},
            {"item": f"{url}/a/Q_KAPPAMASK.json", "reused": True},
        ],
    }
    delete_published(batch, service)
    assert [p.name for p in (out / "a").iterdir()] == ["other.tif"]


def test_requests_answer_within_bounds_of_the_guard_for_odd_methods(guarded: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        answer = requests.request(
            method, f"http://{guarded}/processes/kappamask/execution", timeout=10
        )
        assert answer.status_code == 405 and answer.headers["Allow"] == "POST"
        assert answer.json()["code"] == "InvalidParameterValue"


def test_a_band_file_that_is_a_vrt_is_never_followed(tmp_path: Path) -> None:
    """GDAL opens by content: a "B02.jp2" that is a VRT would read a file outside the data
    roots (or a URL) that the policy never saw. Band files open as JPEG 2000 or GeoTIFF
    only."""
    root = tmp_path / "root"
    safe = root / T29UNU.name
    shutil.copytree(T29UNU, safe)
    band = next(safe.glob("GRANULE/*/IMG_DATA/R60m/*_B02_60m.jp2"))
    secret = tmp_path / "secret.jp2"
    shutil.copyfile(band, secret)
    with rasterio.open(secret) as src:
        width, height, transform, crs = src.width, src.height, src.transform, src.crs
    band.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{crs.to_wkt()}</SRS>'
        f"<GeoTransform>{', '.join(str(v) for v in transform.to_gdal())}</GeoTransform>"
        '<VRTRasterBand dataType="UInt16" band="1"><SimpleSource>'
        f"<SourceFilename>{secret}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>"
        "</VRTRasterBand></VRTDataset>"
    )
    with rasterio.open(band) as vrt:  # what GDAL alone would do: follow it
        assert vrt.driver == "VRT"
    policy = AccessPolicy(data_roots=(root,), output_roots=(tmp_path / "o",))
    product = open_product(str(safe), policy)
    with pytest.raises(ProductError, match="cannot open B02"):
        output_grid(product, 60)


def test_metadata_that_never_ends_or_will_not_inflate_is_refused(tmp_path: Path) -> None:
    """A sparse 40 MB MTD_MSIL2A.xml is refused without being read whole; a zip whose
    members are encrypted is the product's fault (422), not a 500."""
    safe = tmp_path / T29UNU.name
    shutil.copytree(T29UNU, safe)
    with (safe / "MTD_MSIL2A.xml").open("r+b") as mtd:
        mtd.truncate(40 * 2**20)
    with pytest.raises(ProductError, match="larger than"):
        open_product(str(safe))
    archive = Path(shutil.make_archive(str(tmp_path / "p"), "zip", T29UNU.parent, T29UNU.name))
    data = bytearray(archive.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature)
        while start >= 0:
            data[start + flags_at] |= 1  # "encrypted"
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))
    with pytest.raises(ProductError, match=r"cannot read|not a readable zip"):
        open_product(str(archive))
