"""The job queue: a real redis-server, `kappamask serve --broker-url` that only enqueues,
real `kappamask worker` processes that run the jobs, and one of them killed mid-job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pystac
import pytest
import requests

from kappamask.errors import InferenceUnavailableError
from kappamask.inference.server import LocalTriton, free_port

from .conftest import DATA, T22HBD, T29UNU
from .postgres import postgis_cluster
from .processes import (
    Receiver,
    debian_binary,
    service_args,
    start_serve,
    stop,
    submit_async,
    wait_for,
)
from .stac_api import S2_COLLECTION, StacApi


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (the Debian package) on a free port, nothing persisted."""
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    redis = debian_binary("redis-server", ["redis-server"])
    proc = subprocess.Popen(
        [
            redis,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not _redis_answers(port):
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=30)


@dataclass
class Queue:
    url: str
    output_dir: Path
    env: dict[str, str]
    worker_args: list[str]
    base: Path
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    #: every API process (each answers for every job)
    apis: list[str] = field(default_factory=list)

    def start_worker(self) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.base / f"worker-{len(self.workers)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kappamask.cli", "worker", *self.worker_args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,  # its own process group, as a container would be
            )
        self.workers.append((proc, log))
        deadline = time.monotonic() + 90
        while "ready." not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        return proc, log


@contextmanager
def running_queue(
    triton: LocalTriton,
    redis_url: str,
    base: Path,
    manager: dict[str, str] | None = None,
    apis: int = 1,
    workers: int = 2,
) -> Iterator[Queue]:
    """``apis`` API processes that enqueue and ``workers`` workers, sharing the job manager
    (``manager``: its environment; TinyDB behind a file lock by default) and the output
    folder. The first API's port names the results."""
    ports = [free_port() for _ in range(apis)]
    env = {
        "KAPPAMASK_BROKER_URL": redis_url,
        "KAPPAMASK_JOB_OUTPUT_DIR": str(base / "jobs"),
        "KAPPAMASK_JOBS_DB": str(base / "jobs.db"),
        "KAPPAMASK_PUBLIC_URL": f"http://localhost:{ports[0]}",
        # a killed worker's job goes back to the queue after this; the jobs here take less
        "KAPPAMASK_QUEUE_VISIBILITY_S": "12",
        # the STAC API of the tests runs on 127.0.0.1
        "KAPPAMASK_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "KAPPAMASK_ALLOW_PRIVATE_NETWORKS": "true",
        **(manager or {}),
    }
    shared = service_args(triton.http_url, base / "out", DATA)
    started = []
    running = Queue(f"http://127.0.0.1:{ports[0]}", base / "out", env, shared, base)
    try:
        for n, port in enumerate(ports):
            log_path = base / f"serve-{n}.log"
            started.append(start_serve(["--port", str(port), *shared], log_path, env))
            wait_for(f"http://127.0.0.1:{port}", started[-1], log_path)
            running.apis.append(f"http://127.0.0.1:{port}")
        for _ in range(workers):
            running.start_worker()
        yield running
    finally:
        for proc, _log in running.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        for api in started:
            stop(api)


@pytest.fixture(scope="module")
def queue(
    triton: LocalTriton, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Queue]:
    """An API that enqueues and two workers on TinyDB (one machine)."""
    with running_queue(triton, redis_url, tmp_path_factory.mktemp("queue")) as running:
        yield running


def _poll(job_url: str, until: set[str], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(job_url, timeout=10).json()
        if job["status"] in until:
            return dict(job)
        time.sleep(0.2)
    pytest.fail(f"job {job_url} did not reach {until}")


def _worker_of(queue: Queue, job_id: str) -> tuple[subprocess.Popen[bytes], Path]:
    for proc, log in queue.workers:
        if job_id in log.read_text():
            return proc, log
    pytest.fail(f"no worker took job {job_id}")


@pytest.mark.slow
def test_the_api_enqueues_and_workers_run_the_jobs(queue: Queue) -> None:
    job_url = submit_async(
        queue.url, {"product": str(T29UNU), "resolution": 60, "output": "queued"}
    )
    job = _poll(job_url, {"successful", "failed"})
    assert job["status"] == "successful", job
    job_id = job_url.rstrip("/").rsplit("/", 1)[-1]
    _worker_of(queue, job_id)  # a worker ran it, not the API
    result = requests.get(f"{job_url}/results", params={"f": "json"}, timeout=10).json()
    assert result["mask"].startswith(f"{queue.env['KAPPAMASK_PUBLIC_URL']}/outputs/queued/")
    assert requests.get(result["mask"].replace("localhost", "127.0.0.1"), timeout=10).ok
    # a synchronous request waits for its worker, and a failure keeps its status
    body = {"inputs": {"product": str(T29UNU), "resolution": 60, "output": "queued"}}
    sync = requests.post(f"{queue.url}/processes/kappamask/execution", json=body, timeout=300)
    assert sync.status_code == 200 and sync.json()["mask"] == result["mask"], sync.text
    missing = {"inputs": {"product": str(DATA / "s2" / "gone.SAFE")}}
    lost = requests.post(f"{queue.url}/processes/kappamask/execution", json=missing, timeout=300)
    assert lost.status_code == 404 and "does not exist" in lost.json()["description"]


@pytest.mark.slow
def test_a_worker_killed_mid_job_leaves_the_job_to_another_and_one_result(queue: Queue) -> None:
    job_url = submit_async(
        queue.url, {"product": str(T29UNU), "resolution": 20, "output": "killed"}
    )
    job_id = job_url.rstrip("/").rsplit("/", 1)[-1]
    deadline = time.monotonic() + 120
    while (job := requests.get(job_url, timeout=10).json())["progress"] < 20:
        assert job["status"] in ("accepted", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)
    proc, _log = _worker_of(queue, job_id)
    os.killpg(proc.pid, signal.SIGKILL)  # the worker and everything it started
    proc.wait(timeout=30)
    assert requests.get(job_url, timeout=10).json()["status"] == "running"
    job = _poll(job_url, {"successful", "failed"}, timeout=300)
    assert job["status"] == "successful", job
    survivor = [lg for p, lg in queue.workers if p.poll() is None]
    assert any("running it again" in lg.read_text() for lg in survivor)
    folder = queue.output_dir / "killed"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 6 and all(n.startswith(T29UNU.stem) for n in names), names
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no staging left
    queue.start_worker()  # two workers again for what follows


def test_an_unreachable_broker_is_a_503() -> None:
    from kappamask import settings
    from kappamask.jobs import queue as job_queue

    broker = f"redis://:secret@127.0.0.1:{free_port()}/0"
    job_queue.app.cache_clear()
    try:
        with (
            settings.using(settings.Settings(broker_url=broker)),
            pytest.raises(InferenceUnavailableError, match="cannot be reached") as raised,
        ):
            job_queue.enqueue(job_queue.QueuedJob("kappamask", "job-1", {}, None, None, "raw"))
        assert "secret" not in str(raised.value)
    finally:
        job_queue.app.cache_clear()


@pytest.mark.slow
def test_dismissing_a_queued_job_stops_it_wherever_it_is(queue: Queue) -> None:
    """DELETE /jobs/{id}: a worker that has not taken the job drops it, one that runs it
    stops between strips (it reads the shared job record); nothing is published."""
    job_url = submit_async(
        queue.url, {"product": str(T29UNU), "resolution": 20, "output": "dismissed"}
    )
    deleted = requests.delete(job_url, timeout=30)
    assert deleted.status_code == 200, deleted.text
    job = _poll(job_url, {"dismissed", "successful", "failed"})
    assert job["status"] == "dismissed", job
    time.sleep(3)  # a worker that was running it has had time to stop
    assert requests.get(job_url, timeout=10).json()["status"] == "dismissed"
    folder = queue.output_dir / "dismissed"
    assert not folder.exists() or not any(folder.iterdir())


def _logged_by(queue: Queue, job_id: str) -> list[int]:
    """The workers (their index) whose log names ``job_id``."""
    return [n for n, (_proc, log) in enumerate(queue.workers) if job_id in log.read_text()]


@pytest.mark.slow
def test_a_batch_on_the_queue_runs_each_product_as_its_own_job(queue: Queue) -> None:
    missing = str(DATA / "s2" / "S2B_MSIL1C_20991231T000000_N0500_R001_T01AAA_X.SAFE")
    inputs = {
        "products": [str(T29UNU), missing, str(T22HBD)],
        "resolution": 60,
        "output": "season",
        "collection_id": "season",
    }
    with Receiver() as receiver:
        subscriber = {
            "successUri": f"{receiver.url}/success",
            "inProgressUri": f"{receiver.url}/running",
        }
        response = requests.post(
            f"{queue.url}/processes/kappamask-batch/execution",
            json={"inputs": inputs, "subscriber": subscriber},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        batch_url = response.headers["Location"]
        batch = _poll(batch_url, {"successful", "failed", "dismissed"})
        assert batch["status"] == "successful", batch
        assert receiver.wait_for("/success")["succeeded"] == 2
        # one start callback, as the products were queued, not again when the batch ended
        assert [p for p, _ in receiver.posts] == ["/running", "/success"], receiver.posts
    result = requests.get(f"{batch_url}/results", params={"f": "json"}, timeout=10).json()
    outcomes = result["products"]
    assert [p["status"] for p in outcomes] == ["successful", "failed", "successful"], result
    assert "T01AAA" in outcomes[1]["message"] and result["succeeded"] == 2
    assert all(isinstance(p["cloud_cover"], float) for p in outcomes if "product_id" in p)
    children = [p["job"] for p in outcomes]
    assert len(set(children)) == 3
    for child, outcome in zip(children, outcomes, strict=True):
        job = requests.get(f"{queue.url}/jobs/{child}", params={"f": "json"}, timeout=10).json()
        assert job["processID"] == "kappamask" and job["status"] == outcome["status"], job
        assert _logged_by(queue, child), f"no worker ran product job {child}"
    collection = pystac.Collection.from_file(str(queue.output_dir / "season" / "collection.json"))
    collection.validate()
    assert sorted(i.properties["kappamask:product_id"] for i in collection.get_items()) == sorted(
        p["product_id"] for p in outcomes if p["status"] == "successful"
    )
    assert result["collection"].startswith(queue.env["KAPPAMASK_PUBLIC_URL"])


@pytest.mark.slow
def test_dismissing_a_queued_batch_dismisses_its_products(queue: Queue) -> None:
    batch_url = submit_async(
        queue.url,
        {
            "products": [str(T29UNU), str(T22HBD), str(T29UNU)],
            "resolution": 20,
            "output": "dismissed-season",
        },
        "kappamask-batch",
    )
    _poll(batch_url, {"running"}, timeout=120)  # its products are queued as their own jobs
    assert requests.delete(batch_url, timeout=30).status_code == 200
    assert _poll(batch_url, {"dismissed", "successful", "failed"})["status"] == "dismissed"
    jobs = requests.get(f"{queue.url}/jobs", params={"f": "json", "limit": 1000}, timeout=10)
    batch_id = batch_url.rstrip("/").rsplit("/", 1)[-1]
    children = [
        j
        for j in jobs.json()["jobs"]
        if f"of batch {batch_id}" in str(j.get("message")) or j["jobID"] in _children_of(batch_id)
    ]
    assert len(children) == 3
    for child in children:  # every product's job ends dismissed, none left to run
        done = _poll(f"{queue.url}/jobs/{child['jobID']}", {"dismissed", "successful", "failed"})
        assert done["status"] == "dismissed", done
    folder = queue.output_dir / "dismissed-season"
    if (folder / "collection.json").exists():  # what finished before is a valid collection
        pystac.Collection.from_file(str(folder / "collection.json")).validate()


def _children_of(batch_id: str) -> list[str]:
    from kappamask.jobs.fanout import child_id

    return [child_id(batch_id, index) for index in range(3)]


@pytest.mark.slow
def test_a_searched_batch_on_the_queue_publishes_to_the_stac_api(
    queue: Queue, stac_api: StacApi
) -> None:
    search = {
        "url": stac_api.url,
        "collections": [S2_COLLECTION],
        "query": {"eo:cloud_cover": {"lt": 50}},
    }
    inputs = {
        "search": search,
        "stac_api": stac_api.url,
        "resolution": 60,
        "output": "searched",
        "collection_id": "masks-queue",
    }
    batch_url = submit_async(queue.url, inputs, "kappamask-batch")
    assert _poll(batch_url, {"successful", "failed", "dismissed"})["status"] == "successful"
    result = requests.get(f"{batch_url}/results", params={"f": "json"}, timeout=10).json()
    assert [p["product_id"] for p in result["products"]] == [T29UNU.stem], result
    assert result["stac_api"]["published"] == 1 and not result["stac_api"]["errors"], result
    (item,) = stac_api.items("masks-queue")
    public = queue.env["KAPPAMASK_PUBLIC_URL"]
    assert item["assets"]["mask"]["href"].startswith(f"{public}/outputs/searched/"), item
    # refused when submitted, before any job exists: nothing found, an API that is down
    jobs = requests.get(f"{queue.url}/jobs", params={"f": "json", "limit": 1000}, timeout=10)
    before = len(jobs.json()["jobs"])
    body = {"inputs": {**inputs, "search": {**search, "datetime": "2030-01-01/.."}}}
    execute = f"{queue.url}/processes/kappamask-batch/execution"
    nothing = requests.post(execute, json=body, headers={"Prefer": "respond-async"}, timeout=60)
    assert nothing.status_code == 400 and "matched no items" in nothing.text, nothing.text
    down = {"inputs": {**inputs, "stac_api": f"http://127.0.0.1:{free_port()}"}}
    refused = requests.post(execute, json=down, headers={"Prefer": "respond-async"}, timeout=60)
    assert refused.status_code == 502 and "cannot be reached" in refused.text, refused.text
    jobs = requests.get(f"{queue.url}/jobs", params={"f": "json", "limit": 1000}, timeout=10)
    assert len(jobs.json()["jobs"]) == before


@pytest.mark.slow
def test_api_pods_and_workers_share_jobs_in_postgresql(
    triton: LocalTriton, redis_url: str, tmp_path: Path
) -> None:
    """The deployment's layout: two API processes and two workers on pygeoapi's PostgreSQL
    job manager (the table of deploy/postgres/init-jobs.sql): a batch submitted to one API
    is answered by the other, its products run as their own jobs on the workers."""
    import psycopg2

    with postgis_cluster() as dsn:
        with psycopg2.connect(dsn) as conn, conn.cursor() as cursor:
            cursor.execute((DATA.parents[1] / "deploy" / "postgres" / "init-jobs.sql").read_text())
        manager = {
            "KAPPAMASK_JOB_MANAGER": "kappamask.jobs.managers.PostgreSQLManager",
            "KAPPAMASK_JOBS_DB": dsn,
        }
        # a Redis database of its own: the workers of the module's queue share the server
        own_db = redis_url.rsplit("/", 1)[0] + "/1"
        with running_queue(triton, own_db, tmp_path, manager, apis=2) as queue:
            first, second = queue.apis
            batch_url = submit_async(
                first,
                {"products": [str(T29UNU), str(T22HBD)], "resolution": 60, "output": "pg"},
                "kappamask-batch",
            )
            other = f"{second}/jobs/{batch_url.rstrip('/').rsplit('/', 1)[-1]}"
            batch = _poll(other, {"successful", "failed", "dismissed"})
            assert batch["status"] == "successful", batch
            result = requests.get(f"{other}/results", params={"f": "json"}, timeout=10).json()
            assert result["succeeded"] == 2, result
            for outcome in result["products"]:
                job = requests.get(f"{second}/jobs/{outcome['job']}", timeout=10).json()
                assert job["status"] == "successful" and job["processID"] == "kappamask"
                assert _logged_by(queue, outcome["job"])
            # a dismissal through one API is seen by the other
            single = submit_async(
                second, {"product": str(T29UNU), "resolution": 20, "output": "pg-dismissed"}
            )
            single_id = single.rstrip("/").rsplit("/", 1)[-1]
            deleted = requests.delete(f"{first}/jobs/{single_id}", timeout=30)
            assert deleted.status_code == 200, deleted.text
            done = _poll(f"{second}/jobs/{single_id}", {"dismissed", "successful", "failed"})
            assert done["status"] == "dismissed", done


@pytest.mark.slow
def test_a_worker_killed_inside_a_batch_leaves_one_result_per_product(queue: Queue) -> None:
    from kappamask.jobs.fanout import child_id

    batch_url = submit_async(
        queue.url,
        {"products": [str(T29UNU), str(T22HBD)], "resolution": 20, "output": "killed-season"},
        "kappamask-batch",
    )
    batch_id = batch_url.rstrip("/").rsplit("/", 1)[-1]
    first = f"{queue.url}/jobs/{child_id(batch_id, 0)}"
    deadline = time.monotonic() + 120
    while (job := requests.get(first, timeout=10).json()).get("progress", 0) < 20:
        assert job.get("status") in (None, "accepted", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    proc, _log = _worker_of(queue, child_id(batch_id, 0))
    os.killpg(proc.pid, signal.SIGKILL)  # mid-product
    proc.wait(timeout=30)
    batch = _poll(batch_url, {"successful", "failed", "dismissed"}, timeout=300)
    assert batch["status"] == "successful", batch
    result = requests.get(f"{batch_url}/results", params={"f": "json"}, timeout=10).json()
    assert [p["status"] for p in result["products"]] == ["successful", "successful"], result
    folder = queue.output_dir / "killed-season"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 * 6 + 1 and "collection.json" in names, names  # one result each
    collection = pystac.Collection.from_file(str(folder / "collection.json"))
    assert len(list(collection.get_items())) == 2
    queue.start_worker()  # two workers again for what follows
