"""What the HTTP service answers before pygeoapi sees a request.

- ``GET /health``: liveness, 200 while the API process answers.
- ``GET /health/ready``: readiness for a load balancer, 200 only while Triton is ready
  (503 while it is down or restarting).
- ``GET``/``HEAD /outputs/<path>``: the published results of the local output folder, read
  only, with range requests (GDAL's /vsicurl/ and QGIS read the COGs in place), so that the
  URLs a result names can be opened by the client that asked for it. Hidden files and
  folders (staging folders of running jobs, the job database) are never served.
- Request bodies: the whole body within ``KAPPAMASK_READ_TIMEOUT_S`` (default 30 s) of
  the first byte, or 408, so that a client that sends less than its length, trickles or
  says nothing cannot hold a thread; no body without a length (nor chunked), empty; an
  empty POST, 400; larger than the limit, 413; a POST body that is not one JSON object
  (an array, a number, nested deeper than ``MAX_JSON_DEPTH``, not JSON at all, a string
  holding NUL or a lone UTF-16 surrogate), 400 naming where; an execute request whose
  ``inputs``, ``response`` or ``subscriber`` is of the wrong shape, 400. pygeoapi would
  answer those with an HTML 500 page, or parse 50 MB before refusing.
- ``GET /map`` and ``/web/...``: the service's web page and its vendored assets
  (``kappamask.api.site``).
- ``/processes/{id}/execution`` takes POST only (405 with ``Allow: POST``).
- ``GET /jobs/{id}/results`` of a dismissed job: 410 (its outputs are deleted), also when
  the dismissal races the read.
- Error pages: any 4xx/5xx that pygeoapi or Flask answer as HTML is answered as JSON
  unless the client asked for HTML (``f=html`` or a browser's ``Accept``); a 500 never
  shows a traceback or a server path.

Every answer here is an OGC exception document (JSON), as pygeoapi's own are.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import mimetypes
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

from werkzeug.security import safe_join
from werkzeug.utils import send_file

from kappamask.access import has_lone_surrogate
from kappamask.api import site
from kappamask.settings import OUTPUTS_ROUTE, Settings

LOGGER = logging.getLogger(__name__)

#: The settings' defaults: the limits of a guard built without them (tests).
_DEFAULTS = Settings()
#: Deepest nesting of arrays and objects a request may hold (a MultiPolygon is 4).
MAX_JSON_DEPTH = 32
#: The callback URLs of an execute request's ``subscriber`` (OGC API - Processes).
SUBSCRIBER_KEYS = ("successUri", "inProgressUri", "failedUri")
_RESULTS = re.compile(r"/jobs/([^/]+)/results")
#: Content types of answers that are already machine-readable.
_JSON_TYPES = ("application/json", "application/problem+json", "application/geo+json")

#: Media types of the files of a result (STAC items are GeoJSON).
_MEDIA_TYPES = {
    ".tif": "image/tiff; application=geotiff; profile=cloud-optimized",
    ".json": "application/geo+json",
    ".png": "image/png",
}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _answer(
    start_response: Callable[..., Any],
    status: HTTPStatus,
    body: dict[str, Any],
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{status.value} {status.phrase}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers],
    )
    return [data]


def _error(
    start_response: Callable[..., Any],
    status: HTTPStatus,
    code: str,
    description: str,
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    return _answer(
        start_response, status, {"type": code, "code": code, "description": description}, headers
    )


#: Close the connection after an answer given before the body was read to its end: what
#: is left of it is not a next request.
_CLOSE = (("Connection", "close"),)


def _walk(value: Any) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every value of a parsed JSON document with its path (keys and indices), without
    recursion (a body may be nested deeper than Python's stack)."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        yield path, item
        if isinstance(item, dict):
            stack.extend(((*path, k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend(((*path, i), v) for i, v in enumerate(item))


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0)."""
    return max(
        (len(path) + 1 for path, item in _walk(value) if isinstance(item, dict | list)), default=0
    )


def _where(path: tuple[str | int, ...]) -> str:
    """Where in a request: ``input 'product' (assets.B04.href)``, ``subscriber.successUri``."""

    def dotted(parts: tuple[str | int, ...]) -> str:
        text = "".join(f"[{p}]" if isinstance(p, int) else f".{str(p)[:40]}" for p in parts)
        return text.lstrip(".")

    if len(path) >= 2 and path[0] == "inputs":
        rest = dotted(path[2:])
        return f"input '{str(path[1])[:40]}'" + (f" ({rest})" if rest else "")
    return dotted(path) or "the body"


def _not_text(text: str) -> str | None:
    if "\0" in text:
        return "a NUL character"
    if has_lone_surrogate(text):
        return "a lone UTF-16 surrogate"
    return None


class RequestGuard:
    """WSGI middleware in front of pygeoapi (see the module docstring).

    ``job_status``: a job's status by id (None: no such job), for the results of dismissed
    jobs; default: pygeoapi's job manager of this server."""

    def __init__(
        self,
        app: WSGIApp,
        triton_ready: Callable[[], bool],
        max_body_bytes: int = _DEFAULTS.max_request_bytes,
        outputs: Path | None = None,
        read_timeout_s: float = _DEFAULTS.read_timeout_s,
        job_status: Callable[[str], str | None] | None = None,
    ) -> None:
        self.app = app
        self.triton_ready = triton_ready
        self.max_body_bytes = max_body_bytes
        self.outputs = outputs
        self.read_timeout_s = read_timeout_s
        if job_status is None:
            from kappamask.jobs.reporting import job_status as manager_status

            job_status = manager_status
        self.job_status: Callable[[str], str | None] = job_status

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "").rstrip("/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "GET" and path == "/health":
            return _answer(start_response, HTTPStatus.OK, {"status": "alive"})
        if method == "GET" and path == "/health/ready":
            if self.triton_ready():
                return _answer(start_response, HTTPStatus.OK, {"status": "ready"})
            return _answer(
                start_response,
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "unavailable", "reason": "Triton is not ready"},
            )
        if self.outputs is not None and (path + "/").startswith(OUTPUTS_ROUTE + "/"):
            return self._output_file(environ, start_response, path[len(OUTPUTS_ROUTE) :])
        if site.serves(path):
            if method not in ("GET", "HEAD"):
                return _error(
                    start_response,
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    "InvalidParameterValue",
                    "the web page is read only: GET or HEAD",
                    (("Allow", "GET, HEAD"),),
                )
            return site.answer(
                environ,
                start_response,
                path,
                lambda why: _error(start_response, HTTPStatus.NOT_FOUND, "NotFound", why),
            )
        execution = path.startswith("/processes/") and path.endswith("/execution")
        if execution and method != "POST":
            return _error(
                start_response,
                HTTPStatus.METHOD_NOT_ALLOWED,
                "InvalidParameterValue",
                f"{method} is not allowed on an execution endpoint: POST an execute request",
                (("Allow", "POST"),),
            )
        results = _RESULTS.fullmatch(path)
        if results and method in ("GET", "HEAD"):
            return self._job_results(environ, start_response, results.group(1))
        if method not in ("POST", "PUT", "PATCH"):
            return self._json_errors(environ, start_response)
        body, refusal = self._read_body(environ)
        if refusal is not None:
            status, description = refusal
            return _error(start_response, status, "InvalidParameterValue", description, _CLOSE)
        if not body and method == "POST":
            return _error(
                start_response,
                HTTPStatus.BAD_REQUEST,
                "MissingParameterValue",
                "request body is empty: POST a JSON object (an execute request has 'inputs')",
            )
        if body:
            problem = _json_problem(body, execution)
            if problem:
                return _error(
                    start_response, HTTPStatus.BAD_REQUEST, "InvalidParameterValue", problem
                )
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return self._json_errors(environ, start_response)

    def _read_body(self, environ: dict[str, Any]) -> tuple[bytes, tuple[HTTPStatus, str] | None]:
        """The request body, or why it is refused: (status, description)."""
        declared = environ.get("CONTENT_LENGTH")
        chunked = bool(environ.get("wsgi.input_terminated")) or (
            environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        )
        if declared in (None, ""):
            if not chunked:  # no length and no chunks: HTTP/1.1 says there is no body
                return b"", None
            # read one byte more than allowed: a chunked body is cut here
            length, limit = None, self.max_body_bytes + 1
        else:
            try:
                length = int(declared)
            except ValueError:
                return b"", (HTTPStatus.BAD_REQUEST, "malformed Content-Length header")
            if length < 0:
                return b"", (HTTPStatus.BAD_REQUEST, "malformed Content-Length header")
            if length > self.max_body_bytes:
                return b"", (
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body of {length} bytes is over this server's limit of "
                    f"{self.max_body_bytes} bytes",
                )
            limit = length
        body, timed_out = self._read_within_deadline(environ, limit)
        if len(body) > self.max_body_bytes:
            return b"", (
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body is over this server's limit of {self.max_body_bytes} bytes",
            )
        if timed_out:
            return b"", (
                HTTPStatus.REQUEST_TIMEOUT,
                f"request body did not arrive within {self.read_timeout_s:g} s "
                f"({len(body)} of {length if length is not None else '?'} bytes)",
            )
        if length is not None and len(body) < length:
            return b"", (
                HTTPStatus.BAD_REQUEST,
                f"request body ended after {len(body)} of the "
                f"{length} bytes its Content-Length says",
            )
        return body, None

    def _read_within_deadline(self, environ: dict[str, Any], limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes of the body and whether the deadline cut it. At the deadline
        the connection's reading side is shut, which ends a read blocked on a client that
        trickles or stalls (a socket timeout alone restarts with every byte)."""
        stream = environ["wsgi.input"]
        sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):  # the client has gone already
                    sock.shutdown(socket.SHUT_RD)

        timer = threading.Timer(self.read_timeout_s, expire)
        timer.daemon = True
        timer.start()
        chunks: list[bytes] = []
        got = 0
        try:
            while got < limit and not expired.is_set():
                chunk = stream.read(min(65536, limit - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (OSError, ValueError):  # a socket timeout, a connection reset or shut
            return b"".join(chunks), True
        finally:
            timer.cancel()
        return b"".join(chunks), expired.is_set() and got < limit

    def _job_results(
        self, environ: dict[str, Any], start_response: Callable[..., Any], job_id: str
    ) -> Any:
        """A job's results; those of a dismissed job are gone (410), also when the
        dismissal happens while pygeoapi reads them (it would answer 500)."""

        def gone(_status: int) -> tuple[HTTPStatus, str, str] | None:
            state = self.job_status(job_id)
            if state == "dismissed":
                return (
                    HTTPStatus.GONE,
                    "NoSuchJob",
                    f"job {job_id} was dismissed: its results are deleted",
                )
            if state is None:
                return HTTPStatus.NOT_FOUND, "NoSuchJob", f"no job {job_id}"
            return None

        refusal = gone(0)
        if refusal is not None and refusal[0] == HTTPStatus.GONE:
            return _error(start_response, *refusal)
        return self._json_errors(environ, start_response, gone)

    def _json_errors(
        self,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        on_server_error: Callable[[int], tuple[HTTPStatus, str, str] | None] | None = None,
    ) -> Any:
        """The app's answer, with an HTML (or text) error page replaced by an OGC exception
        document unless the client asked for HTML; ``on_server_error`` may replace a 5xx."""
        query = environ.get("QUERY_STRING", "")
        accept = environ.get("HTTP_ACCEPT", "")
        wants_html = "f=html" in query or ("text/html" in accept and "f=json" not in query)
        replaced: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            code = int(status.split()[0])
            media = next((v for k, v in headers if k.lower() == "content-type"), "")
            html_error = code >= 400 and not media.startswith(_JSON_TYPES) and not wants_html
            better = on_server_error(code) if on_server_error and code >= 500 else None
            if html_error or better is not None:
                replaced["answer"] = better or _page_error(code)
                return lambda _data: None
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        body = self.app(environ, capture)
        if not replaced:
            return body
        if hasattr(body, "close"):
            body.close()
        return _error(start_response, *replaced["answer"])

    def _output_file(
        self, environ: dict[str, Any], start_response: Callable[..., Any], relative: str
    ) -> Any:
        """A published file of the output folder (see the module docstring)."""
        assert self.outputs is not None
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _error(
                start_response,
                HTTPStatus.METHOD_NOT_ALLOWED,
                "InvalidParameterValue",
                "results are read only: GET or HEAD",
            )
        parts = [p for p in relative.split("/") if p]
        found = safe_join(str(self.outputs), *parts) if parts else None
        if found is None or any(p.startswith(".") for p in parts) or not Path(found).is_file():
            return _error(
                start_response,
                HTTPStatus.NOT_FOUND,
                "NotFound",
                f"no published result at {OUTPUTS_ROUTE}{relative}",
            )
        media = _MEDIA_TYPES.get(Path(found).suffix.lower()) or (
            mimetypes.guess_type(found)[0] or "application/octet-stream"
        )
        response = send_file(found, environ, mimetype=media, conditional=True, max_age=0)
        # a web map elsewhere (OpenLayers, QGIS in a browser) may read the COGs by range
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Expose-Headers"] = "Content-Range, Content-Length, ETag"
        return response(environ, start_response)


def _page_error(code: int) -> tuple[HTTPStatus, str, str]:
    """What an error page of pygeoapi or Flask says, as an OGC exception."""
    try:
        status = HTTPStatus(code)
    except ValueError:
        status = HTTPStatus.INTERNAL_SERVER_ERROR
    if status >= 500:
        return (
            status,
            "NoApplicableCode",
            "internal error of the service; it is logged on the server",
        )
    if status == HTTPStatus.NOT_FOUND:
        return status, "NotFound", "no such resource"
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        return status, "InvalidParameterValue", "method not allowed on this resource"
    return status, "InvalidParameterValue", status.phrase


def _json_problem(body: bytes, execution: bool = False) -> str | None:
    """Why ``body`` is not an acceptable request document, or None; ``execution``: it is
    an execute request, whose parts pygeoapi reads without checking their types."""
    try:
        value = json.loads(body)
    except RecursionError:
        return f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
    except (ValueError, UnicodeDecodeError) as err:
        return f"request body is not valid JSON: {err}"
    if not isinstance(value, dict):
        return f"request body must be a JSON object, not {type(value).__name__}"
    if json_depth(value) > MAX_JSON_DEPTH:
        return f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
    for path, item in _walk(value):
        for text in (item, path[-1] if path else None):
            found = _not_text(text) if isinstance(text, str) else None
            if found:
                return f"{_where(path)} holds {found}, which is not text"
    return _execute_problem(value) if execution else None


def _execute_problem(request: dict[str, Any]) -> str | None:
    """What is wrong with the shape of an execute request (OGC API - Processes), or None."""
    if "inputs" in request and not isinstance(request["inputs"], dict):
        return "'inputs' must be a JSON object of the process's inputs"
    if "outputs" in request and not isinstance(request["outputs"], dict | type(None)):
        return "'outputs' must be a JSON object"
    if request.get("response", "raw") not in ("raw", "document"):
        return "'response' must be 'raw' or 'document'"
    subscriber = request.get("subscriber")
    if subscriber is None:
        return None
    if not isinstance(subscriber, dict):
        return (
            "'subscriber' must be a JSON object with successUri (and optionally "
            "inProgressUri, failedUri)"
        )
    for key in SUBSCRIBER_KEYS:
        url = subscriber.get(key)
        if url is not None and (not isinstance(url, str) or not url.strip()):
            return f"subscriber.{key} must be a URL"
    if not subscriber.get("successUri"):
        return (
            "subscriber.successUri is required (OGC API - Processes); inProgressUri and "
            "failedUri are optional"
        )
    return None
