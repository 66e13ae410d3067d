"""A service that heals: real processes killed by PID, and what a client sees next.

- the local Triton killed (SIGKILL) during a job: the job fails naming Triton, the
  backend stubs die with it, /health/ready answers 503 until the supervisor has started
  it again, then the next job succeeds;
- `kappamask serve` killed during a job, then started again on the same output folder and
  job database: the job is reported failed ("interrupted"), its staging folder removed,
  another live process's staging folder kept.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from kappamask.inference.server import free_port
from kappamask.storage.sinks import STAGING_PREFIX

from . import processes as ps
from .conftest import DATA, T29UNU

pytestmark = pytest.mark.slow


def _submit(url: str, inputs: dict[str, object]) -> str:
    """An async job's id."""
    return ps.submit_async(url, inputs).rsplit("/", 1)[-1]


def _job(url: str, job_id: str) -> dict[str, object]:
    job: dict[str, object] = requests.get(f"{url}/jobs/{job_id}", timeout=10).json()
    return job


def _until(what: str, check: object, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _crunching(url: str, job_id: str) -> bool:
    """Running and past reading: crops are being inferred."""
    job = _job(url, job_id)
    assert job["status"] in ("accepted", "running"), job
    return job["status"] == "running" and "crops" in str(job.get("message", ""))


def test_killed_triton_is_restarted_and_the_next_job_succeeds(tmp_path: Path) -> None:
    """With the first restart 8 s away, the running job's retries (3.5 s) run out: it fails
    naming Triton. (With the default 1 s, Triton is usually back within them and the job
    finishes as if nothing had happened.)"""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # no --data-root: KAPPAMASK_DATA_ROOTS decides, not the current folder
    (tmp_path / "here.SAFE").mkdir()
    proc = ps.start_serve(
        ["--port", str(port), "--output-dir", str(tmp_path / "out")],
        log,
        {
            "KAPPAMASK_DATA_ROOTS": str(DATA),
            "KAPPAMASK_JOB_OUTPUT_DIR": str(tmp_path / "jobs"),
            "KAPPAMASK_JOBS_DB": str(tmp_path / "jobs.db"),
            "KAPPAMASK_TRITON_RESTART_DELAY_S": "8",
        },
        cwd=tmp_path,
    )
    try:
        ps.wait_for(url, proc, log)
        assert requests.get(f"{url}/health/ready", timeout=10).status_code == 200
        refused = requests.post(
            f"{url}/processes/kappamask/execution",
            json={"inputs": {"product": "here.SAFE"}},
            timeout=60,
        )
        assert refused.status_code == 403 and "outside the data roots" in refused.text

        job_id = _submit(url, {"product": str(T29UNU), "resolution": 10, "overwrite": True})
        _until("the job to infer crops", lambda: _crunching(url, job_id))
        (server,) = ps.tritonservers_on(ps.triton_port(log))
        group = ps.process_group(server)
        assert len(group) >= 2, group  # the server and its Python backend stubs
        os.kill(server, signal.SIGKILL)

        seen_ready: list[int] = []

        def ready() -> bool:
            seen_ready.append(requests.get(f"{url}/health/ready", timeout=10).status_code)
            return seen_ready[-1] == 200

        def failed() -> bool:
            ready()  # look at readiness all along
            status = _job(url, job_id)["status"]
            assert status != "successful", "the job outlived Triton's death"
            return status == "failed"

        _until("the job to fail", failed)
        message = str(_job(url, job_id)["message"])
        assert message.startswith("NoApplicableCode: ") and "Triton" in message, message
        assert "run again" in message
        _until("the old stubs to die", lambda: not any(ps.alive(p) for p in group), 30)
        _until("Triton to be ready again", ready)
        assert 503 in seen_ready  # not ready while it was down
        assert "restarting in 8 s" in log.read_text()
        assert "int() argument" not in log.read_text()  # polling logs nothing

        response = requests.post(
            f"{url}/processes/kappamask/execution",
            json={"inputs": {"product": str(T29UNU), "resolution": 60}},
            timeout=300,
        )
        assert response.status_code == 200, response.text
    finally:
        ps.stop(proc)
    assert [p for p in ps.process_group(server) if ps.alive(p)] == []


def test_restart_fails_interrupted_jobs_and_removes_their_staging(tmp_path: Path) -> None:
    out, jobs_db = tmp_path / "out", tmp_path / "jobs.db"
    env = {"KAPPAMASK_JOB_OUTPUT_DIR": str(tmp_path / "jobs"), "KAPPAMASK_JOBS_DB": str(jobs_db)}
    # the staging folder of a live process on this host (this test's): never removed
    out.mkdir()
    live = out / f"{STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}.feedface"
    live.mkdir()

    def started(name: str) -> tuple[subprocess.Popen[bytes], str, Path]:
        port, log = free_port(), tmp_path / f"{name}.log"
        args = ["--port", str(port), "--output-dir", str(out), "--data-root", str(DATA)]
        proc = ps.start_serve(args, log, env)
        ps.wait_for(f"http://127.0.0.1:{port}", proc, log)
        return proc, f"http://127.0.0.1:{port}", log

    first, url, log = started("first")
    try:
        job_id = _submit(url, {"product": str(T29UNU), "resolution": 10, "output": "big"})
        _until("the job to infer crops", lambda: _crunching(url, job_id))
        staging = list((out / "big").glob(f"{STAGING_PREFIX}*"))
        assert staging, "the running job stages its files"
        (server,) = ps.tritonservers_on(ps.triton_port(log))
        group = ps.process_group(server)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        # its Triton and the stubs die with it
        _until("the dead service's Triton to go", lambda: not any(ps.alive(p) for p in group), 60)
    finally:
        ps.stop(first)

    second, url, log = started("second")
    try:
        job = _job(url, job_id)
        assert job["status"] == "failed", job
        assert "interrupted: the service restarted" in str(job["message"])
        assert not any(p.exists() for p in staging)
        assert live.is_dir()
        assert "marked failed" in log.read_text()
    finally:
        ps.stop(second)
