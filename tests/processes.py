"""Helpers of the tests that start `kappamask serve` and kill real processes, and a real
HTTP receiver of callbacks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from kappamask.inference.server import free_port


def start_serve(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """`kappamask serve ARGS` in a subprocess, its output appended to ``log_path``."""
    with log_path.open("a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kappamask.cli", "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )


def service_args(triton_url: str, output_dir: Path, *data_roots: Path) -> list[str]:
    """The flags `kappamask serve` and `kappamask worker` share: a running Triton, the
    output folder, the data roots."""
    roots = [arg for root in data_roots for arg in ("--data-root", str(root))]
    return ["--triton-url", triton_url, "--output-dir", str(output_dir), *roots]


def apt_install(packages: list[str]) -> None:
    """Install Debian ``packages`` where that is allowed (root with apt-get, as in CI:
    .ci/run installs them before the tests); elsewhere nothing."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        subprocess.run(command, env=env, check=False, capture_output=True, timeout=900)


def debian_binary(name: str, packages: list[str]) -> str:
    """The path of the system binary ``name``, its Debian ``packages`` installed when it is
    missing (``apt_install``)."""
    found = shutil.which(name)
    if found is None:
        apt_install(packages)
        found = shutil.which(name)
    if found is None:
        pytest.fail(f"these tests need {name}: apt-get install {' '.join(packages)}")
    return found


@contextmanager
def served(triton_url: str, base: Path, data_root: Path) -> Iterator[str]:
    """`kappamask serve` on a running Triton, its files under ``base``; its URL."""
    port = free_port()
    log = base / "serve.log"
    env = {"KAPPAMASK_JOB_OUTPUT_DIR": str(base / "jobs"), "KAPPAMASK_JOBS_DB": str(base / "db")}
    args = ["--port", str(port), *service_args(triton_url, base / "out", data_root)]
    proc = start_serve(args, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, proc, log)
        yield url
    finally:
        stop(proc)


def wait_for(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 90) -> None:
    """Until the service at ``url`` lists its processes (fail with its log if it dies)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/processes", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not up, or busy starting
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("kappamask serve did not start:\n" + log_path.read_text())
        time.sleep(0.3)


def _cmdline(pid: int) -> list[bytes]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _stat(pid: int) -> list[str]:
    try:
        text = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...


def pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as dead: it holds no memory)."""
    stat = _stat(pid)
    return bool(stat) and stat[0] != "Z"


def tritonservers_on(port: int) -> list[int]:
    """Live tritonserver processes listening on HTTP ``port``."""
    return [
        pid
        for pid in pids()
        if (cmd := _cmdline(pid))
        and cmd[0].endswith(b"tritonserver")
        and f"--http-port={port}".encode() in cmd
        and alive(pid)
    ]


def process_group(pgid: int) -> list[int]:
    """Live members of process group ``pgid`` (a tritonserver and its backend stubs)."""
    return [pid for pid in pids() if (stat := _stat(pid)) and stat[2] == str(pgid) and alive(pid)]


def triton_port(log_path: Path) -> int:
    """The HTTP port of the local Triton a `kappamask serve` log says it started."""
    return int(log_path.read_text().split("starting Triton on 127.0.0.1:")[-1].split()[0])


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 60) -> None:
    """Send ``sig`` and wait; a process that does not stop is killed (never left running
    past its test) and the test fails."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"process {proc.pid} did not stop within {timeout:.0f} s of signal {sig}")


def submit_async(url: str, inputs: dict[str, Any], process: str = "kappamask") -> str:
    """POST an asynchronous job of ``process`` to the service at ``url``; the job's URL."""
    response = requests.post(
        f"{url}/processes/{process}/execution",
        json={"inputs": inputs},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return str(response.headers["Location"])


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST (path, JSON body) and
    answers with the statuses queued for its path (then 200)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.statuses: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append((self.path, json.loads(body or b"null")))
                queued = receiver.statuses.get(self.path) or [200]
                status = queued.pop(0) if len(queued) > 1 else queued[0]
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, path: str, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seen, body in self.posts:
                if seen == path:
                    return body
            time.sleep(0.1)
        pytest.fail(f"no callback to {path}; got {self.posts}")
