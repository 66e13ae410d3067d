"""What the HTTP service answers before pygeoapi sees a request.

- ``GET /health``: liveness, 200 while the API process answers.
- ``GET /health/ready``: readiness for a load balancer, 200 only while Triton is ready
  (503 while it is down or restarting).
- ``GET``/``HEAD /outputs/<path>``: the published results of the local output folder, read
  only, with range requests (GDAL's /vsicurl/ and QGIS read the COGs in place), so that the
  URLs a result names can be opened by the client that asked for it. Hidden files and
  folders (staging folders of running jobs, the job database) are never served.
- Request bodies: larger than the limit, 413; a POST body that is not one JSON object
  (an array, a number, nested deeper than ``MAX_JSON_DEPTH``, not JSON at all), 400.
  pygeoapi would answer those with an HTML 500 page, or parse 50 MB before refusing.

Every answer here is an OGC exception document (JSON), as pygeoapi's own are.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
from collections.abc import Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from werkzeug.security import safe_join
from werkzeug.utils import send_file

LOGGER = logging.getLogger(__name__)

#: Default limit of a request body; an execute request is a few kB (a STAC item or an
#: AOI polygon of some thousands of vertices stays far below it).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_BODY_ENV = "KAPPAMASK_MAX_REQUEST_BYTES"
#: Deepest nesting of arrays and objects a request may hold (a MultiPolygon is 4).
MAX_JSON_DEPTH = 32

#: Where the local output folder is served.
OUTPUTS_ROUTE = "/outputs"
#: Media types of the files of a result (STAC items are GeoJSON).
_MEDIA_TYPES = {".tif": "image/tiff; application=geotiff; profile=cloud-optimized",
                ".json": "application/geo+json", ".png": "image/png"}  # fmt: skip

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _answer(
    start_response: Callable[..., Any], status: HTTPStatus, body: dict[str, Any]
) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{status.value} {status.phrase}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]


def _error(
    start_response: Callable[..., Any], status: HTTPStatus, code: str, description: str
) -> list[bytes]:
    return _answer(start_response, status, {"type": code, "code": code,
                                            "description": description})  # fmt: skip


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0)."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        if isinstance(item, dict | list):
            depth = max(depth, d)
            level.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


class RequestGuard:
    """WSGI middleware in front of pygeoapi (see the module docstring)."""

    def __init__(self, app: WSGIApp, triton_ready: Callable[[], bool],
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 outputs: Path | None = None) -> None:  # fmt: skip
        self.app = app
        self.triton_ready = triton_ready
        self.max_body_bytes = max_body_bytes
        self.outputs = outputs

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "").rstrip("/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "GET" and path == "/health":
            return _answer(start_response, HTTPStatus.OK, {"status": "alive"})
        if method == "GET" and path == "/health/ready":
            if self.triton_ready():
                return _answer(start_response, HTTPStatus.OK, {"status": "ready"})
            return _answer(start_response, HTTPStatus.SERVICE_UNAVAILABLE,
                           {"status": "unavailable", "reason": "Triton is not ready"})  # fmt: skip
        if self.outputs is not None and (path + "/").startswith(OUTPUTS_ROUTE + "/"):
            return self._output_file(environ, start_response, path[len(OUTPUTS_ROUTE) :])
        if method not in ("POST", "PUT", "PATCH"):
            return self.app(environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _error(start_response, HTTPStatus.BAD_REQUEST, "InvalidParameterValue",
                          "malformed Content-Length header")  # fmt: skip
        if length > self.max_body_bytes:
            return _error(
                start_response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "InvalidParameterValue",
                f"request body of {length} bytes is over this server's limit of "
                f"{self.max_body_bytes} bytes",
            )  # fmt: skip
        # read one byte more than allowed: a chunked body without a length is cut here
        body = environ["wsgi.input"].read(min(length, self.max_body_bytes) if length
                                          else self.max_body_bytes + 1)  # fmt: skip
        if len(body) > self.max_body_bytes:
            return _error(start_response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          "InvalidParameterValue",
                          f"request body is over this server's limit of "
                          f"{self.max_body_bytes} bytes")  # fmt: skip
        if body:
            problem = _json_problem(body)
            if problem:
                return _error(start_response, HTTPStatus.BAD_REQUEST, "InvalidParameterValue",
                              problem)  # fmt: skip
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return self.app(environ, start_response)

    def _output_file(
        self, environ: dict[str, Any], start_response: Callable[..., Any], relative: str
    ) -> Any:
        """A published file of the output folder (see the module docstring)."""
        assert self.outputs is not None
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _error(start_response, HTTPStatus.METHOD_NOT_ALLOWED, "InvalidParameterValue",
                          "results are read only: GET or HEAD")  # fmt: skip
        parts = [p for p in relative.split("/") if p]
        found = safe_join(str(self.outputs), *parts) if parts else None
        if found is None or any(p.startswith(".") for p in parts) or not Path(found).is_file():
            return _error(start_response, HTTPStatus.NOT_FOUND, "NotFound",
                          f"no published result at {OUTPUTS_ROUTE}{relative}")  # fmt: skip
        media = _MEDIA_TYPES.get(Path(found).suffix.lower()) or (
            mimetypes.guess_type(found)[0] or "application/octet-stream"
        )
        response = send_file(found, environ, mimetype=media, conditional=True, max_age=0)
        return response(environ, start_response)


def _json_problem(body: bytes) -> str | None:
    """Why ``body`` is not an acceptable request document, or None."""
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
    return None
