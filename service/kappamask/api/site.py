"""The service's own web page, for a person with a browser (``kappamask.api.guard`` routes here):

- ``GET /map``: submit a product, follow its job, see the mask on a map with the class
  colours and a legend, and open every file of the result (``web/index.html``,
  ``web/app.js``); ``/map?job=ID`` follows a job submitted elsewhere;
- ``GET /web/<path>``: its assets, and the vendored libraries under ``/web/vendor``
  (OpenLayers, proj4, Bootstrap, Swagger UI: ``tools/vendor_web.sh``), so that nothing is
  fetched from a CDN;
- pygeoapi's HTML pages in ``templates/`` (see ``TEMPLATES``);
- ``GET /web/classes.json``: the mask's classes as the page draws them, from
  ``kappamask.bands`` (the same codes, names and colours as the COGs and the preview).
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from werkzeug.security import safe_join
from werkzeug.utils import send_file

from kappamask.bands import CLASS_COLORS, CLASS_NAMES, MaskClass

WEB = Path(__file__).parent / "web"
#: Jinja templates that pygeoapi renders before its own (``kappamask.api.serve.guarded_app``):
#: the page frame with the vendored stylesheet, Swagger UI from the vendored copy, the
#: process page (inputs, an example request, a link here) and a job's results (links, the
#: product, the map).
TEMPLATES = Path(__file__).parent / "templates"
MAP_ROUTE = "/map"
WEB_ROUTE = "/web"
_MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def classes() -> list[dict[str, Any]]:
    """Each class with data: its code, name and colour (RGB 0-255, alpha 0-1)."""
    return [
        {
            "code": int(code),
            "name": CLASS_NAMES[MaskClass(code)],
            "color": [*CLASS_COLORS[code][:3], round(CLASS_COLORS[code][3] / 255, 3)],
        }
        for code in CLASS_COLORS
        if code in CLASS_NAMES and CLASS_COLORS[code][3] > 0
    ]


def serves(path: str) -> bool:
    """Whether ``path`` is the page's or its assets'."""
    return path == MAP_ROUTE or (path + "/").startswith(WEB_ROUTE + "/")


def answer(
    environ: dict[str, Any],
    start_response: Callable[..., Any],
    path: str,
    not_found: Callable[[str], Any],
) -> Any:
    """The page or one of its assets (GET/HEAD); ``not_found(description)`` otherwise."""
    if path == MAP_ROUTE:
        path = f"{WEB_ROUTE}/index.html"
    relative = path[len(WEB_ROUTE) :].strip("/")
    if relative == "classes.json":
        body = json.dumps(classes()).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(f"{HTTPStatus.OK.value} OK", headers)
        return [body]
    parts = [p for p in relative.split("/") if p]
    found = safe_join(str(WEB), *parts) if parts else None
    if found is None or any(p.startswith(".") for p in parts) or not Path(found).is_file():
        return not_found(f"no page or asset at {path}")
    media = _MEDIA_TYPES.get(Path(found).suffix) or (
        mimetypes.guess_type(found)[0] or "application/octet-stream"
    )
    return send_file(found, environ, mimetype=media, conditional=True, max_age=3600)(
        environ, start_response
    )
