"""Fast layer (no server): request guard, input validation, sinks that leave nothing,
stale staging folders, job recovery."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from kappamask.api.guard import MAX_JSON_DEPTH, RequestGuard, json_depth
from kappamask.api.process import parse_inputs
from kappamask.errors import InvalidInputError
from kappamask.jobs.reporting import INTERRUPTED_MESSAGE, fail_interrupted_jobs
from kappamask.storage.sinks import STAGING_PREFIX, LocalSink, remove_stale_staging


def _call(
    guard: RequestGuard,
    method: str,
    path: str,
    body: bytes = b"",
    length: str | None = None,
    chunked: bool = False,
) -> tuple[int, dict[str, Any]]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = int(status.split()[0]), dict(headers)

    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)) if length is None else length,
        "wsgi.input_terminated": chunked,
    }
    out = b"".join(guard(environ, start_response))
    return seen["status"], json.loads(out)


def _inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The app behind the guard: echoes the body it was given."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"passed": body.decode()}).encode()]


@pytest.fixture
def guard() -> RequestGuard:
    state = {"ready": True}
    g = RequestGuard(
        _inner, lambda: state["ready"], max_body_bytes=1000, job_status=lambda _job: None
    )
    g.state = state  # type: ignore[attr-defined]
    return g


def test_health_follows_triton(guard: RequestGuard) -> None:
    assert _call(guard, "GET", "/health") == (200, {"status": "alive"})
    assert _call(guard, "GET", "/health/ready")[0] == 200
    guard.state["ready"] = False  # type: ignore[attr-defined]
    status, body = _call(guard, "GET", "/health/ready")
    assert status == 503 and "Triton" in body["reason"]
    assert _call(guard, "GET", "/health")[0] == 200  # alive all the same


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"[1, 2, 3]", 400, "must be a JSON object, not list"),
        (b"42", 400, "must be a JSON object, not int"),
        (b'{"inputs": ', 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[" * 50_000 + b"]" * 50_000, 413, "over this server's limit"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, 400, f"nested deeper than {MAX_JSON_DEPTH}"),
    ],
)
def test_bodies_pygeoapi_would_choke_on_get_json_4xx(
    guard: RequestGuard, body: bytes, status: int, message: str
) -> None:
    got, answer = _call(guard, "POST", "/processes/kappamask/execution", body)
    assert got == status and answer["code"] == "InvalidParameterValue"
    assert message in answer["description"]


def test_deep_nesting_within_the_size_limit_is_refused_without_recursing() -> None:
    guard = RequestGuard(_inner, lambda: True, max_body_bytes=1_000_000, job_status=lambda _j: None)
    status, answer = _call(guard, "POST", "/x", b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and "nested deeper" in answer["description"]
    assert json_depth({"a": [{"b": [1]}]}) == 4 and json_depth(3) == 0


def test_a_lying_or_absent_length_is_cut_at_the_limit(guard: RequestGuard) -> None:
    big = b'{"a": "' + b"x" * 2000 + b'"}'
    assert _call(guard, "POST", "/x", big, length="", chunked=True)[0] == 413
    assert _call(guard, "POST", "/x", b"{}", length="ten")[0] == 400
    assert _call(guard, "POST", "/x", b"{}", length="-5")[0] == 400
    # no length and no chunks: no body (never read to the limit: that would wait on the
    # client), and an empty POST is the client's mistake
    status, answer = _call(guard, "POST", "/x", big, length="")
    assert status == 400 and "request body is empty" in answer["description"]
    status, answer = _call(guard, "POST", "/x", b"{}", length="10")
    assert status == 400 and "ended after 2 of the 10 bytes" in answer["description"]


def test_good_bodies_and_other_methods_pass_through(guard: RequestGuard) -> None:
    assert _call(guard, "POST", "/x", b'{"inputs": {}}') == (200, {"passed": '{"inputs": {}}'})
    assert _call(guard, "GET", "/processes") == (200, {"passed": ""})


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"product": "x" * 100_000}, "is 100000 characters long; at most 2048"),
        ({"product": "a\nb"}, "'product' holds control characters"),
        ({"product": "p", "output": "a\x00b"}, "'output' holds control characters"),
        ({"product": "p", "model": "kappamask_l2a/versions/1"}, "'model' must be a model name"),
        ({"product": "p", "model": "../x"}, "'model' must be a model name"),
        ({"product": "  "}, "'product' must be a path"),
    ],
)
def test_string_inputs_are_bounded_and_never_echoed(inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_inputs(inputs)
    assert len(str(info.value)) < 200


def test_model_names_with_a_version_label_are_accepted() -> None:
    _product, _output, options = parse_inputs({"product": " p ", "model": "kappamask_l2a:v2.1"})
    assert options.model == "kappamask_l2a:v2.1"


def test_a_run_that_fails_leaves_no_folder_it_made(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), LocalSink(tmp_path / "kept" / "a" / "b") as sink:
        sink.path("x.tif").write_bytes(b"1")
        raise RuntimeError("inference failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"]
    assert list((tmp_path / "kept").iterdir()) == []
    with LocalSink(tmp_path / "new") as sink:  # a committed result stays
        sink.path("x.tif").write_bytes(b"1")
        sink.commit({"x": "x.tif"})
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["x.tif"]


def test_stale_staging_folders_are_those_of_dead_processes_here(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead_pid = 2**22 + 12345  # above the kernel's pid_max: no such process
    folders = {
        "dead": tmp_path / "a" / f"{STAGING_PREFIX}{dead_pid}@{host}.1",
        "ours": tmp_path / f"{STAGING_PREFIX}{os.getpid()}@{host}.2",  # made before a restart
        "live": tmp_path / f"{STAGING_PREFIX}1@{host}.3",  # pid 1 is always alive
        "other host": tmp_path / f"{STAGING_PREFIX}{dead_pid}@elsewhere.example.4",
    }
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / "mask.tif").write_bytes(b"x")
    removed = remove_stale_staging(tmp_path)
    assert sorted(removed) == sorted([folders["dead"], folders["ours"]])
    assert folders["live"].is_dir() and folders["other host"].is_dir()


class _Manager:
    """The part of pygeoapi's job manager interface recovery uses."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = {j["identifier"]: j for j in jobs}

    def get_jobs(self) -> dict[str, Any]:
        return {"jobs": list(self.jobs.values()), "numberMatched": len(self.jobs)}

    def update_job(self, job_id: str, update: dict[str, Any]) -> bool:
        self.jobs[job_id].update(update)
        return True


def test_jobs_left_running_are_failed_at_start_up() -> None:
    manager = _Manager(
        [
            {"identifier": i, "status": s}
            for i, s in (
                ("a", "running"),
                ("b", "accepted"),
                ("c", "successful"),
                ("d", "dismissed"),
            )
        ]
    )
    assert fail_interrupted_jobs(manager) == ["a", "b"]
    assert [manager.jobs[i]["status"] for i in "abcd"] == [
        "failed",
        "failed",
        "successful",
        "dismissed",
    ]
    assert manager.jobs["a"]["message"] == INTERRUPTED_MESSAGE
