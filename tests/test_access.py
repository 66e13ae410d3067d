"""What a request may touch (paths, URLs, S3 settings) and how jobs report and wait."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from kappamask.access import DEFAULT_ALLOWED_HOSTS, AccessPolicy, host_matches
from kappamask.errors import AccessDeniedError, CancelledError, InvalidInputError
from kappamask.jobs.reporting import JobReporter, inference_slot
from kappamask.settings import Settings
from kappamask.storage.s3 import S3Settings, split_s3_url

from .conftest import DATA, S3_SECRET


def test_host_patterns() -> None:
    assert host_matches("sentinel-cogs.s3.us-west-2.amazonaws.com", DEFAULT_ALLOWED_HOSTS)
    assert host_matches("EARTH-SEARCH.aws.element84.com.", DEFAULT_ALLOWED_HOSTS)
    assert not host_matches("amazonaws.com.evil.org", DEFAULT_ALLOWED_HOSTS)
    assert not host_matches("evilamazonaws.com", ["*.amazonaws.com"])
    assert host_matches("anything", ["*"])


def test_urls_are_checked() -> None:
    policy = AccessPolicy(
        allowed_hosts=("example.org", "127.0.0.1", "localhost"), allow_private_networks=False
    )
    for url, error, text in [
        ("ftp://example.org/x.json", InvalidInputError, "only http(s)"),
        ("file:///etc/passwd", InvalidInputError, "file://"),
        ("https://user:pw@example.org/x.json", InvalidInputError, "credentials"),
        ("https://example.com/x.json", AccessDeniedError, "not among the hosts"),
        ("http://127.0.0.1:8080/x.json", AccessDeniedError, "loopback or private"),
        ("http://localhost/x.json", AccessDeniedError, "loopback or private"),
    ]:
        with pytest.raises(error, match=re.escape(text)):
            policy.url(url)
    open_policy = AccessPolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=True)
    assert open_policy.url("http://127.0.0.1:8080/x.json")


def test_server_policy_from_the_settings(tmp_path: Path) -> None:
    env = {
        "KAPPAMASK_DATA_ROOTS": f"{DATA}:{tmp_path}",
        "KAPPAMASK_ALLOWED_HOSTS": "a.example, *.b.example",
        "KAPPAMASK_OUTPUT_DIR": str(tmp_path / "out"),
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "KAPPAMASK_S3_REQUESTER_PAYS": "1",
    }
    policy = AccessPolicy.for_server(Settings.from_env(env))
    assert policy.data_roots == (DATA, tmp_path)
    assert policy.allowed_hosts == ("a.example", "*.b.example")
    assert not policy.allow_private_networks
    assert policy.s3.endpoint_url == "http://minio:9000" and policy.s3.requester_pays
    assert S3_SECRET not in repr(policy)
    # the public STAC APIs and the current folder where none are set
    only_output = {"KAPPAMASK_OUTPUT_DIR": str(tmp_path / "out")}
    policy = AccessPolicy.for_server(Settings.from_env(only_output))
    assert policy.data_roots == (Path("."),) and "*.amazonaws.com" in (policy.allowed_hosts or ())
    # outputs: relative to the output folder, absolute ones only inside it
    assert policy.local_output("sub", tmp_path / "out") == (tmp_path / "out" / "sub").resolve()
    with pytest.raises(AccessDeniedError):
        policy.local_output("../escape", tmp_path / "out")
    with pytest.raises(AccessDeniedError):
        policy.local_output(str(tmp_path / "elsewhere"), tmp_path / "out")


def test_s3_settings_for_boto3_and_gdal() -> None:
    settings = Settings.from_env(
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000/", "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    ).s3()
    assert settings.gdal_options() == {
        "AWS_S3_ENDPOINT": "127.0.0.1:9000",
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    assert S3_SECRET not in repr(settings) and S3_SECRET not in str(settings.gdal_options())
    assert S3Settings(requester_pays=True).request_extra() == {"RequestPayer": "requester"}
    assert split_s3_url("s3://bucket/a/b.SAFE") == ("bucket", "a/b.SAFE")
    with pytest.raises(InvalidInputError):
        split_s3_url("s3:///nokey")


@pytest.fixture
def manager(tmp_path: Path) -> object:
    from kappamask.jobs.managers import TinyDBManager

    (tmp_path / "jobs").mkdir()
    return TinyDBManager(
        {
            "name": "TinyDB",
            "connection": str(tmp_path / "jobs.db"),
            "output_dir": str(tmp_path / "jobs"),
        }
    )


def test_job_progress_and_cancellation_through_a_real_manager(manager: object) -> None:
    manager.add_job(
        {
            "identifier": "j1",
            "status": "accepted",
            "progress": 5,  # type: ignore[attr-defined]
            "type": "process",
            "process_id": "kappamask",
        }
    )
    job = JobReporter("j1", manager)
    job.update(40, "8/16 crops")
    stored = manager.get_job("j1")  # type: ignore[attr-defined]
    assert (stored["status"], stored["progress"], stored["message"]) == (
        "running",
        40,
        "8/16 crops",
    )
    assert not job.cancelled()
    manager.delete_job("j1")  # type: ignore[attr-defined]
    assert job.cancelled()
    job.update(50, "no job any more")  # must not raise


def test_a_dismissal_is_never_overwritten_by_the_job_s_last_report(manager: object) -> None:
    """The job's end (pygeoapi writes "successful") and its progress arriving after the
    dismissal leave it dismissed: the write itself carries the condition."""
    manager.add_job(
        {
            "identifier": "j2",
            "status": "running",
            "progress": 40,  # type: ignore[attr-defined]
            "type": "process",
            "process_id": "kappamask",
        }
    )
    assert manager.update_job("j2", {"progress": 60})  # type: ignore[attr-defined]
    manager.delete_job("j2")  # type: ignore[attr-defined]
    assert not manager.update_job("j2", {"status": "successful", "progress": 100})  # type: ignore[attr-defined]
    JobReporter("j2", manager).update(95, "writing")
    stored = manager.get_job("j2")  # type: ignore[attr-defined]
    assert (stored["status"], stored["progress"]) == ("dismissed", 60)


def test_inference_slots_make_jobs_wait_and_waiting_jobs_can_be_cancelled(
    manager: object,
) -> None:
    for name in ("holder", "waiter"):
        manager.add_job(
            {
                "identifier": name,
                "status": "accepted",
                "progress": 5,  # type: ignore[attr-defined]
                "type": "process",
                "process_id": "kappamask",
            }
        )
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with inference_slot(1, JobReporter("holder", manager)):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(10)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            with inference_slot(1, JobReporter("waiter", manager)):
                pass
        except CancelledError as err:
            outcome.append(err)

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 10
    while "waiting" not in manager.get_job("waiter").get("message", ""):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert manager.get_job("waiter")["status"] == "accepted"  # type: ignore[attr-defined]
    manager.delete_job("waiter")  # type: ignore[attr-defined]
    waiter.join(10)
    assert outcome and "cancelled" in str(outcome[0])
    release.set()
    thread.join(10)
