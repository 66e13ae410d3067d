"""Where pygeoapi 0.21 answers otherwise than OGC API - Processes - Part 1: Core 1.0, put
right, so that OGC clients (OWSLib, QGIS's processing plugins, the OGC test suite) need no
workaround. The official schemas are in tests/data/ogcapi-processes-1.0 and every answer
below is validated against them (tests/test_ogc.py).

- **201 Created** (``Prefer: respond-async``): the body is the job's status document
  (``statusInfo``: ``jobID``, ``status``, ``links``), the one ``GET /jobs/{id}`` answers;
  pygeoapi sends ``null`` or ``{}``.
- **The conformance declaration** adds the job-list and dismiss classes, which the
  service meets and pygeoapi leaves out.
- **A dismissal** answers the job's status document as JSON (pygeoapi labels it HTML).
- **Status documents** leave out the times a job does not have yet (pygeoapi writes
  ``"finished": null``, which the schema refuses: a date-time, or nothing), and link to
  the job itself (``self``), so that a client polls what the document names.
- **Results**: one shape per ``response`` of the execute request, the same whether the job
  ran synchronously or asynchronously:

  - ``raw`` (the default): the output itself, the result object;
  - ``document``: OGC's results document, ``{"result": {"value": {...}, "mediaType":
    "application/json"}}`` (``results.yaml``: output id to qualified value), where
    pygeoapi writes ``{"outputs": [{...}]}``.

  ``GET /jobs/{id}/results`` answers what the execute request asked for.
- **The OpenAPI document** is self-contained (``openapi_document``): pygeoapi refers to the
  OGC's schema server for its responses and schemas, which an air-gapped deployment (and
  a client such as schemathesis there) cannot reach. The official files are vendored in
  ``ogcapi-processes-1.0/`` (with the OGC's licence) and become components of the
  document.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

#: The execute request's ``response`` values (OGC API - Processes 1.0, execute.yaml).
RAW, DOCUMENT = "raw", "document"
_EXECUTION = re.compile(r"/processes/[^/]+/execution/?")
_JOBS = re.compile(r"/jobs(/[^/]+)?/?")
#: Requirement classes the service meets beyond those pygeoapi declares: the job list
#: (``/jobs``, validated against jobList.yaml) and dismissal (``DELETE /jobs/{id}``).
EXTRA_CONFORMANCE = (
    "http://www.opengis.net/spec/ogcapi-processes-1/1.0/conf/job-list",
    "http://www.opengis.net/spec/ogcapi-processes-1/1.0/conf/dismiss",
)

#: The official OpenAPI parts of OGC API - Processes 1.0 (``schemas/``, ``responses/``).
OGC_OPENAPI = Path(__file__).parent / "ogcapi-processes-1.0"
#: Where the OGC publishes them: pygeoapi's references start so.
PROCESSES_OPENAPI_URL = "https://schemas.opengis.net/ogcapi/processes/part1/1.0/openapi/"
#: The OGC API - Features responses pygeoapi refers to, and the Processes response of the
#: same name and meaning that stands for each.
_FEATURES_RESPONSES = (
    "https://schemas.opengis.net/ogcapi/features/part1/1.0/openapi/"
    "ogcapi-features-1.yaml#/components/responses/"
)
_STANDS_FOR = {
    f"{_FEATURES_RESPONSES}{name}": f"responses/{name}.yaml"
    for name in ("InvalidParameter", "LandingPage", "ServerError", "NotFound")
}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def results_document(metadata: dict[str, Any], outputs: Any, media_type: str) -> dict[str, Any]:
    """OGC's results document of a process with one output: its id to the qualified value."""
    (output_id,) = metadata["outputs"]
    return {output_id: {"value": outputs, "mediaType": media_type}}


class DocumentedProcessor:
    """A processor whose ``execute`` answers the results document: what a job that asked
    for ``response: document`` runs, so that pygeoapi records that document (and no other
    shape) as the job's result, with no moment where another shape could be read."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def execute(self, data: dict[str, Any], **kwargs: Any) -> tuple[str, dict[str, Any]]:
        media_type, outputs = self._processor.execute(data, **kwargs)
        return "application/json", results_document(self.metadata, outputs, media_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


class OGCAnswers:
    """WSGI middleware: a 201 answer to an execute request carries the job's status
    document, read from the app's own ``GET /jobs/{id}``; a status document (alone or in
    the job list) leaves out the times a job does not have yet (pygeoapi writes
    ``"finished": null`` where the schema wants a date-time or nothing)."""

    def __init__(self, app: WSGIApp, base_url: str) -> None:
        self.app = app
        self.base_url = base_url.rstrip("/")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "")
        if method == "POST" and _EXECUTION.fullmatch(path):
            return self._rewritten(environ, start_response, "201", self._created)
        if method == "GET" and path.rstrip("/") == "/conformance":
            return self._rewritten(environ, start_response, "200", _with_extra_conformance)
        if method == "GET" and _JOBS.fullmatch(path):
            return self._rewritten(environ, start_response, "200", self._status_documents)
        if method == "DELETE" and _JOBS.fullmatch(path):  # JSON, which pygeoapi calls HTML
            return self._rewritten(environ, start_response, "200", self._status_documents, True)
        return self.app(environ, start_response)

    def _rewritten(
        self,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        code: str,
        rewrite: Callable[[dict[str, Any], list[tuple[str, str]]], Any],
        any_media: bool = False,
    ) -> Any:
        """The app's answer; one with status ``code`` (and JSON, unless ``any_media``)
        goes through ``rewrite`` (its body and environ, its headers -> the new body)."""
        seen: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            media = next((v for k, v in headers if k.lower() == "content-type"), "")
            if status.startswith(code) and (code == "201" or any_media or "json" in media):
                seen.update(status=status, headers=headers)
                return lambda _data: None
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        body = self.app(environ, capture)
        if not seen:
            return body
        try:
            text = b"".join(body)
        finally:
            if hasattr(body, "close"):
                body.close()
        headers = [
            (k, v)
            for k, v in seen["headers"]
            if k.lower() not in ("content-type", "content-length")
        ]
        payload = json.dumps(rewrite({"body": text, "environ": environ}, headers)).encode()
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        start_response(seen["status"], headers)
        return [payload]

    def _created(self, answer: dict[str, Any], headers: list[tuple[str, str]]) -> Any:
        location = next((v for k, v in headers if k.lower() == "location"), "")
        return self._job_status(answer["environ"], location.rstrip("/").rsplit("/", 1)[-1])

    def _job_status(self, environ: dict[str, Any], job_id: str) -> dict[str, Any]:
        """What ``GET /jobs/{job_id}`` answers on this server (JSON), without nulls."""
        inner = {k: v for k, v in environ.items() if not k.startswith(("HTTP_", "CONTENT_"))}
        inner.update(
            REQUEST_METHOD="GET",
            PATH_INFO=f"/jobs/{job_id}",
            QUERY_STRING="f=json",
            HTTP_ACCEPT="application/json",
            **{"wsgi.input": io.BytesIO(b"")},
        )
        status: list[str] = []

        def collect(code: str, _headers: list[tuple[str, str]], _exc: Any = None) -> Any:
            status.append(code)
            return lambda _data: None

        chunks = self.app(inner, collect)
        try:
            text = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        if not status or not status[0].startswith("200"):
            # the job was recorded before the 201: this is the server's own fault
            raise RuntimeError(f"job {job_id} has no status document ({status})")
        document: dict[str, Any] = self._status_documents({"body": text}, [])
        return document

    def _status_documents(self, answer: dict[str, Any], _headers: list[tuple[str, str]]) -> Any:
        """A status document, or a job list, with each job's null properties left out and
        links to the job itself (pygeoapi lists only its results)."""
        document = json.loads(answer["body"])
        jobs = document.get("jobs") if isinstance(document, dict) else None
        for job in jobs if isinstance(jobs, list) else [document]:
            if not isinstance(job, dict) or "jobID" not in job:
                continue
            for key in [k for k, v in job.items() if v is None]:
                del job[key]
            job.setdefault("type", "process")  # required; pygeoapi's dismissal has none
            href = f"{self.base_url}/jobs/{job['jobID']}"
            links = [link for link in job.get("links", []) if link.get("rel") != "self"]
            job["links"] = [
                {
                    "href": f"{href}?f=json",
                    "rel": "self",
                    "type": "application/json",
                    "title": "this job's status",
                },
                {
                    "href": f"{href}?f=html",
                    "rel": "alternate",
                    "type": "text/html",
                    "title": "this job's status as HTML",
                },
                *links,
            ]
        return document


def _with_extra_conformance(answer: dict[str, Any], _headers: list[tuple[str, str]]) -> Any:
    document = json.loads(answer["body"])
    classes = document.setdefault("conformsTo", [])
    classes.extend(c for c in EXTRA_CONFORMANCE if c not in classes)
    return document


def openapi_document(config: Path) -> str:
    """pygeoapi's OpenAPI document of ``config`` (YAML), self-contained."""
    from pygeoapi.openapi import generate_openapi_document

    document = yaml.safe_load(generate_openapi_document(config, "yaml"))
    return str(yaml.safe_dump(self_contained(documented(document)), sort_keys=False))


#: The Processes 1.0 response (``responses/NAME.yaml``) of each operation's success, by
#: method and path. pygeoapi 0.21 names some wrongly (the landing page for /conformance),
#: others not at all (a bare "successful operation"). Results take ExecuteSync's any-shape
#: schema: a job asked for ``raw`` answers the output itself (``results_document``).
_SUCCESS = (
    ("get", re.compile(r"/"), "200", "LandingPage"),
    ("get", re.compile(r"/conformance"), "200", "ConformanceDeclaration"),
    ("get", re.compile(r"/processes"), "200", "ProcessList"),
    ("get", re.compile(r"/processes/[^/]+"), "200", "ProcessDescription"),
    ("post", _EXECUTION, "200", "ExecuteSync"),
    ("post", _EXECUTION, "201", "ExecuteAsync"),
    ("get", re.compile(r"/jobs"), "200", "JobList"),
    ("get", re.compile(r"/jobs/[^/]+"), "200", "Status"),
    ("delete", re.compile(r"/jobs/[^/]+"), "200", "Status"),
    ("get", re.compile(r"/jobs/[^/]+/results"), "200", "ExecuteSync"),
)
#: Formats every page is also served in (the ``f`` parameter): HTML, and JSON-LD where
#: pygeoapi has it.
_ALSO_SERVED = {
    "text/html": {"schema": {"type": "string"}},
    "application/ld+json": {"schema": {"type": "object"}},
}


def _official_response(name: str) -> dict[str, Any]:
    """The Processes 1.0 response ``name``, its schemas referred to by published URL."""
    text = (OGC_OPENAPI / "responses" / f"{name}.yaml").read_text()
    response: dict[str, Any] = yaml.safe_load(
        re.sub(r"""(\$ref: *["']?)\.\./""", rf"\g<1>{PROCESSES_OPENAPI_URL}", text)
    )
    return response


def documented(document: dict[str, Any]) -> dict[str, Any]:
    """pygeoapi's OpenAPI ``document`` with what the service answers documented: each
    operation's success by the Processes 1.0 responses (``_SUCCESS``), the other formats
    of a page, and every other status as an OGC exception document (``default``: every
    error here is one, ``kappamask.api.guard``). Refers to the OGC's files by their published
    URL; ``self_contained`` brings them in."""
    exception = {
        "description": "An error: the status says which (OGC exception document; "
        "an HTML page where the client asked for HTML).",
        "content": {
            "application/json": {
                "schema": {"$ref": PROCESSES_OPENAPI_URL + "schemas/exception.yaml"}
            },
            "text/html": {"schema": {"type": "string"}},
        },
    }
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for verb, pattern, status, name in _SUCCESS:
                if verb == method and pattern.fullmatch(path):
                    responses[status] = _official_response(name)
            responses.pop("204", None)  # a dismissal answers the job's status (200)
            responses["default"] = exception
            success = responses.get("200", {})
            if success.get("$ref") in _STANDS_FOR:  # inline, to list the other formats
                success = responses["200"] = _official_response(
                    Path(_STANDS_FOR[success["$ref"]]).stem
                )
            if method == "get" and "content" in success:
                for media, body in _ALSO_SERVED.items():
                    success["content"].setdefault(media, body)
    return document


def self_contained(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with every reference to the OGC's schema server replaced by one to a
    component made of the vendored file (``#/components/schemas/ogc-statusInfo``); a
    reference to anything else outside the document is refused."""
    components: dict[str, Any] = document.setdefault("components", {})

    def component(relative: str) -> str:
        kind, name = relative.split("/")
        section = components.setdefault(kind, {})
        key = "ogc-" + name.removesuffix(".yaml")
        if key not in section:
            section[key] = {}  # taken before it is filled: a schema may refer to itself
            content = yaml.safe_load((OGC_OPENAPI / kind / name).read_text())
            section[key] = rewritten(content, kind)
        return f"#/components/{kind}/{key}"

    def target(ref: str, kind: str | None) -> str:
        if ref.startswith("#"):
            return ref
        if ref in _STANDS_FOR:
            return component(_STANDS_FOR[ref])
        if ref.startswith(PROCESSES_OPENAPI_URL):
            return component(ref[len(PROCESSES_OPENAPI_URL) :])
        if kind is not None and "://" not in ref:  # relative, inside a vendored file
            return component(posixpath.normpath(posixpath.join(kind, ref)))
        raise ValueError(f"OpenAPI reference {ref!r} is neither in the document nor vendored")

    def rewritten(node: Any, kind: str | None) -> Any:
        if isinstance(node, dict):
            # examples kept elsewhere in the OGC's repository (not vendored) are left out
            out = {
                k: rewritten(v, kind)
                for k, v in node.items()
                if not (k == "examples" and "externalValue" in json.dumps(v))
            }
            if isinstance(node.get("$ref"), str):
                out["$ref"] = target(node["$ref"], kind)
            return out
        if isinstance(node, list):
            return [rewritten(v, kind) for v in node]
        return node

    paths = rewritten(document.get("paths", {}), None)
    own = rewritten({k: v for k, v in components.items()}, None)
    components.update(own)
    document["paths"] = paths
    return document
