"""OGC API - Processes - Part 1: Core 1.0, checked by what others wrote: every answer of the
service against the standard's official JSON schemas (vendored in
service/kappamask/api/ogcapi-processes-1.0), schemathesis against the service's own OpenAPI
document, and OWSLib's execute -> poll -> results with no workaround."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from kappamask.api.ogc import OGC_OPENAPI, openapi_document, results_document, self_contained
from kappamask.api.serve import write_config
from kappamask.inference.server import LocalTriton
from kappamask.settings import Settings

from .conftest import DATA, T22HBD
from .processes import served

SCHEMAS = OGC_OPENAPI / "schemas"
#: Where the OGC publishes the same files: their relative $refs resolve against it.
SCHEMA_BASE = "https://schemas.opengis.net/ogcapi/processes/part1/1.0/openapi/schemas/"
RESULTS_REL = "http://www.opengis.net/def/rel/ogc/1.0/results"
FINISHED = {"successful", "failed", "dismissed"}

ROOT = Path(__file__).resolve().parents[1]


class OGCSchemas:
    """The official schemas by file name, resolvable offline."""

    def __init__(self, folder: Path) -> None:
        resources = [
            (
                SCHEMA_BASE + path.name,
                Resource.from_contents(
                    yaml.safe_load(path.read_text()), default_specification=DRAFT202012
                ),
            )
            for path in sorted(folder.glob("*.yaml"))
        ]
        self.registry: Registry[Any] = Registry().with_resources(resources)

    def check(self, name: str, document: Any) -> None:
        """Fail with every violation of ``name`` (e.g. ``statusInfo.yaml``)."""
        validator = Draft202012Validator({"$ref": SCHEMA_BASE + name}, registry=self.registry)
        errors = [
            f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(document)
        ]
        assert not errors, f"{name}:\n" + "\n".join(errors[:20])


@pytest.fixture(scope="module")
def schemas() -> OGCSchemas:
    return OGCSchemas(SCHEMAS)


@pytest.fixture(scope="module")
def api(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`kappamask serve` on the session's Triton; its URL."""
    with served(triton.http_url, tmp_path_factory.mktemp("ogc"), DATA) as url:
        yield url


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _pointer(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_the_openapi_document_is_self_contained_and_names_ogc_s_responses(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, Settings(), ROOT / "pygeoapi-config.yml")
    document = yaml.safe_load(openapi_document(config))
    refs = set(_refs(document))
    assert refs and all(ref.startswith("#/") for ref in refs), sorted(refs)
    for ref in refs:  # every one resolves inside the document
        assert isinstance(_pointer(document, ref), dict), ref
    paths = document["paths"]

    def json_schema(path: str, method: str, status: str) -> Any:
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]

    # pygeoapi's own document calls the conformance declaration a landing page
    assert json_schema("/conformance", "get", "200") == {
        "$ref": "#/components/schemas/ogc-confClasses"
    }
    assert json_schema("/jobs/{jobId}", "delete", "200") == {
        "$ref": "#/components/schemas/ogc-statusInfo"
    }
    created = paths["/processes/kappamask/execution"]["post"]["responses"]["201"]
    assert created["content"]["application/json"]["schema"]["$ref"].endswith("ogc-statusInfo")
    for operations in paths.values():  # any other status: an exception document
        for operation in operations.values():
            assert operation["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ogc-exception"
            }
    # the vendored schemas are the official ones, unchanged
    status = _pointer(document, "#/components/schemas/ogc-statusInfo")
    assert status["required"] == ["jobID", "status", "type"]


def test_a_reference_to_anything_not_vendored_is_refused() -> None:
    document = {
        "paths": {"/": {"get": {"responses": {"200": {"$ref": "https://example.com/x.yaml"}}}}}
    }
    with pytest.raises(ValueError, match="neither in the document nor vendored"):
        self_contained(document)


def test_a_results_document_names_the_output_and_its_media_type() -> None:
    metadata = {"outputs": {"result": {"schema": {"type": "object"}}}}
    value = {"mask": "https://example.com/m.tif"}
    document = results_document(metadata, value, "application/json")
    assert document == {"result": {"value": value, "mediaType": "application/json"}}
    OGCSchemas(SCHEMAS).check("results.yaml", document)


def _json(url: str, **kwargs: Any) -> Any:
    response = requests.get(url, params={"f": "json"}, timeout=30, **kwargs)
    assert response.status_code == 200, (url, response.status_code, response.text[:300])
    return response.json()


def _poll(job_url: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := _json(job_url))["status"] not in FINISHED:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return dict(job)


def _link(document: dict[str, Any], rel: str) -> str:
    """The JSON representation's href of a link relation (HTML ones are listed too)."""
    return str(
        next(
            link["href"]
            for link in document["links"]
            if link["rel"] == rel and link.get("type") == "application/json"
        )
    )


#: What a result says of its own run rather than of the published files.
RUN_FIELDS = ("reused", "crops_inferred", "seconds")


def _same(result: dict[str, Any], other: dict[str, Any]) -> bool:
    """The same published result, whether computed or found (``reused``)."""
    run = dict.fromkeys(RUN_FIELDS)
    return {**result, **run} == {**other, **run}


INPUTS = {"product": str(T22HBD), "resolution": 60, "output": "ogc"}


@pytest.mark.slow
def test_discovery_answers_validate(api: str, schemas: OGCSchemas) -> None:
    schemas.check("landingPage.yaml", _json(api))
    conformance = _json(f"{api}/conformance")
    schemas.check("confClasses.yaml", conformance)
    declared = set(conformance["conformsTo"])
    for name in ("core", "json", "oas30", "ogc-process-description", "job-list", "dismiss"):
        assert f"http://www.opengis.net/spec/ogcapi-processes-1/1.0/conf/{name}" in declared
    listing = _json(f"{api}/processes")
    schemas.check("processList.yaml", listing)
    for summary in listing["processes"]:
        schemas.check("process.yaml", _json(f"{api}/processes/{summary['id']}"))


@pytest.mark.slow
def test_sync_results_have_one_shape_per_response(api: str, schemas: OGCSchemas) -> None:
    """raw (the default): the result object; document: OGC's results document holding the
    same object. Asynchronous jobs answer the same two shapes at /jobs/{id}/results."""
    url = f"{api}/processes/kappamask/execution"
    raw = requests.post(url, json={"inputs": INPUTS}, timeout=300)
    assert raw.status_code == 200, raw.text
    result = raw.json()
    assert result["mask"].endswith("_KAPPAMASK.tif")
    document = requests.post(url, json={"inputs": INPUTS, "response": "document"}, timeout=300)
    assert document.status_code == 200, document.text
    schemas.check("results.yaml", document.json())
    assert document.json()["result"]["mediaType"] == "application/json"
    again = document.json()["result"]["value"]
    assert again["reused"] and _same(again, result)  # the same result, found this time
    for response in ("raw", "document"):
        created = requests.post(
            url,
            json={"inputs": INPUTS, "response": response},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        status = created.json()
        schemas.check("statusInfo.yaml", status)
        assert created.headers["Location"].endswith(f"/jobs/{status['jobID']}")
        assert status["status"] in {"accepted", "running", "successful"}
        job = _poll(created.headers["Location"])
        schemas.check("statusInfo.yaml", job)
        assert job["status"] == "successful", job
        assert job["message"] == f"{result['product_id']}: done"  # the job names its product
        fetched = _json(_link(job, RESULTS_REL))
        if response == "document":
            schemas.check("results.yaml", fetched)
            fetched = fetched["result"]["value"]
        assert _same(fetched, result)


@pytest.mark.slow
def test_job_list_and_failures_validate(api: str, schemas: OGCSchemas) -> None:
    listing = _json(f"{api}/jobs")
    schemas.check("jobList.yaml", listing)
    for job in listing["jobs"]:
        schemas.check("statusInfo.yaml", _json(_link(job, "self")))
    missing = requests.get(f"{api}/jobs/no-such-job", params={"f": "json"}, timeout=30)
    assert missing.status_code == 404
    schemas.check("exception.yaml", missing.json())
    bad = requests.post(
        f"{api}/processes/kappamask/execution",
        json={"inputs": {"product": "/nowhere.SAFE"}},
        timeout=30,
    )
    assert 400 <= bad.status_code < 500
    schemas.check("exception.yaml", bad.json())


@pytest.mark.slow
def test_owslib_runs_async_execute_poll_results(api: str, schemas: OGCSchemas) -> None:
    """OWSLib, as its documentation shows it: execute async, then follow the status
    document's links (poll, results) with nothing the standard does not promise."""
    from owslib.ogcapi.processes import Processes

    client = Processes(api, headers={"Accept": "application/json"})
    status = client.execute("kappamask", inputs={**INPUTS, "overwrite": True}, async_=True)
    schemas.check("statusInfo.yaml", status)
    job = _poll(_link(status, "self"))
    assert job["status"] == "successful", job
    results = _json(_link(job, RESULTS_REL))  # OWSLib asks for a document by default
    schemas.check("results.yaml", results)
    value = results["result"]["value"]
    assert value["item"].endswith("_KAPPAMASK.json") and not value["reused"]
    assert requests.get(value["mask"], timeout=30).status_code == 200


@pytest.mark.slow
def test_schemathesis_finds_nothing_against_the_openapi_document(api: str, tmp_path: Path) -> None:
    """schemathesis (PyPI) generates requests for every operation of the service's own
    OpenAPI document (examples, edge cases, then random ones) and checks each answer: no
    5xx, every status and content type documented, every body valid against its schema,
    each within 10 s. The document is self-contained: nothing is fetched from the OGC."""
    cli = Path(sys.executable).parent / "schemathesis"
    checks = (
        "not_a_server_error,status_code_conformance,response_schema_conformance,"
        "content_type_conformance"
    )
    done = subprocess.run(
        [
            str(cli),
            "run",
            f"{api}/openapi?f=json",
            "--url",
            api,
            "--checks",
            checks,
            "--max-response-time",
            "10",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # its cache
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "Errored" not in done.stdout, done.stdout[-3000:]
