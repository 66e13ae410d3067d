"""OGC subscriber callbacks: checked at submission, delivered to a real local HTTP receiver,
never able to fail the job they report on; for single and batch jobs (kappamask-batch over
HTTP)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pystac
import pytest
import requests
from pygeoapi.util import Subscriber

from kappamask.access import AccessPolicy
from kappamask.errors import AccessDeniedError, InvalidInputError
from kappamask.inference.server import LocalTriton, free_port
from kappamask.jobs import callbacks
from kappamask.jobs.callbacks import check_subscriber, deliver

from .conftest import DATA, T29UNU
from .processes import Receiver, service_args, start_serve, stop, wait_for


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setattr(callbacks, "FIRST_PAUSE_S", 0.01)
    with Receiver() as running:
        yield running


LOCAL = AccessPolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=True)


def test_the_product_url_policy_checks_callback_urls() -> None:
    public_only = AccessPolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=False)
    with pytest.raises(AccessDeniedError, match="loopback or private"):
        check_subscriber(Subscriber("http://127.0.0.1:9/done", None, None), public_only)
    with pytest.raises(InvalidInputError, match="only http"):
        check_subscriber(Subscriber("http://127.0.0.1:9/ok", None, "ftp://127.0.0.1/x"), LOCAL)
    with pytest.raises(AccessDeniedError, match="not among the hosts"):
        check_subscriber(Subscriber("http://192.0.2.7/done", None, None), LOCAL)
    check_subscriber(Subscriber("http://127.0.0.1:9/a", "http://127.0.0.1:9/b", None), LOCAL)
    check_subscriber(None, public_only)


def test_a_busy_receiver_gets_the_callback_again(receiver: Receiver) -> None:
    receiver.statuses["/done"] = [503, 502, 200]
    assert deliver(f"{receiver.url}/done", {"jobID": "j"}, LOCAL)
    assert receiver.posts == [("/done", {"jobID": "j"})] * 3


def test_refusals_redirects_and_dead_receivers_are_dropped_without_raising(
    receiver: Receiver,
) -> None:
    receiver.statuses["/refuses"] = [400]
    assert not deliver(f"{receiver.url}/refuses", {}, LOCAL)
    assert [p for p, _ in receiver.posts] == ["/refuses"]  # a 4xx is not asked again
    receiver.statuses["/moved"] = [302]
    assert not deliver(f"{receiver.url}/moved", {}, LOCAL)
    assert "/redirected" not in [p for p, _ in receiver.posts]  # redirects are not followed
    dead = f"http://127.0.0.1:{free_port()}/gone"
    assert not deliver(dead, {}, LOCAL)
    refused = AccessPolicy(allowed_hosts=("example.org",))
    assert not deliver(f"{receiver.url}/never", {}, refused)  # checked again before sending
    assert "/never" not in [p for p, _ in receiver.posts]


@pytest.fixture(scope="module")
def service(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`kappamask serve` that may call back to 127.0.0.1 (private networks allowed)."""
    base = tmp_path_factory.mktemp("callbacks")
    port = free_port()
    log_path = base / "serve.log"
    env = {
        "KAPPAMASK_JOB_OUTPUT_DIR": str(base / "jobs"),
        "KAPPAMASK_JOBS_DB": str(base / "jobs.db"),
        "KAPPAMASK_ALLOWED_HOSTS": "127.0.0.1",
        "KAPPAMASK_ALLOW_PRIVATE_NETWORKS": "true",
    }
    args = ["--port", str(port), *service_args(triton.http_url, base / "out", DATA)]
    proc = start_serve(args, log_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, proc, log_path)
        yield url
    finally:
        stop(proc)


def _subscriber(receiver: Receiver, name: str) -> dict[str, str]:
    return {
        "successUri": f"{receiver.url}/{name}/success",
        "inProgressUri": f"{receiver.url}/{name}/running",
        "failedUri": f"{receiver.url}/{name}/failed",
    }


def _submit(url: str, inputs: dict[str, Any], subscriber: dict[str, str]) -> str:
    response = requests.post(
        f"{url}/processes/kappamask/execution",
        json={"inputs": inputs, "subscriber": subscriber},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return str(response.headers["Location"])


@pytest.mark.slow
def test_an_async_job_calls_back_as_it_starts_and_succeeds(
    service: str, receiver: Receiver
) -> None:
    job_url = _submit(
        service,
        {"product": str(T29UNU), "resolution": 60, "output": "cb"},
        _subscriber(receiver, "ok"),
    )
    job_id = job_url.rstrip("/").rsplit("/", 1)[-1]
    started = receiver.wait_for("/ok/running")
    assert started["jobID"] == job_id and started["status"] == "running"
    assert started["processID"] == "kappamask"
    results = receiver.wait_for("/ok/success")
    assert results["mask"].endswith("_KAPPAMASK.tif") and "cloud_cover" in results
    job = requests.get(job_url, timeout=10).json()
    assert job["status"] == "successful"
    assert "/ok/failed" not in [p for p, _ in receiver.posts]


@pytest.mark.slow
def test_a_failed_job_calls_back_with_its_cause(service: str, receiver: Receiver) -> None:
    missing = str(DATA / "no_such_product.SAFE")
    job_url = _submit(service, {"product": missing}, _subscriber(receiver, "bad"))
    failed = receiver.wait_for("/bad/failed")
    assert failed["status"] == "failed" and failed["jobID"] in job_url
    assert "no_such_product" in failed["message"]
    assert requests.get(job_url, timeout=10).json()["message"] == failed["message"]
    assert "/bad/success" not in [p for p, _ in receiver.posts]


@pytest.mark.slow
def test_a_dead_receiver_does_not_fail_the_job(service: str) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    subscriber = {"successUri": f"{gone}/success", "inProgressUri": f"{gone}/running"}
    inputs = {"product": str(T29UNU), "resolution": 60, "output": "dead"}
    job_url = _submit(service, inputs, subscriber)
    deadline = time.monotonic() + 300
    while (job := requests.get(job_url, timeout=10).json())["status"] not in {
        "successful",
        "failed",
    }:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "successful", job


@pytest.mark.slow
def test_a_batch_job_over_http_calls_back_with_its_collection(
    service: str, receiver: Receiver
) -> None:
    """kappamask-batch as a client drives it: one request, a callback with the collection,
    which pystac opens from the URL the service serves it at."""
    missing = str(DATA / "s2" / "S2B_MSIL2A_20991231T000000_N0500_R001_T02BBB_X.SAFE")
    body = {
        "inputs": {
            "products": [str(T29UNU), missing],
            "resolution": 60,
            "output": "season",
            "collection_id": "season-1",
        },
        "subscriber": _subscriber(receiver, "batch"),
    }
    response = requests.post(
        f"{service}/processes/kappamask-batch/execution",
        json=body,
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    result = receiver.wait_for("/batch/success")
    assert result["succeeded"] == 1 and result["failed"] == 1
    outcomes = {p["product"]: p for p in result["products"]}
    assert outcomes[missing]["status"] == "failed" and "T02BBB" in outcomes[missing]["message"]
    assert outcomes[str(T29UNU)]["item"].startswith("http://")
    collection = pystac.Collection.from_file(result["collection"])
    assert collection.id == "season-1"
    items = list(collection.get_items())
    assert [i.properties["kappamask:product_id"] for i in items] == [T29UNU.stem]
    assert requests.get(items[0].assets["mask"].get_absolute_href(), timeout=10).ok
    bad = requests.post(
        f"{service}/processes/kappamask-batch/execution",
        json={"inputs": {"products": []}},
        timeout=30,
    )
    assert bad.status_code == 400 and "at least one product" in bad.json()["description"]
