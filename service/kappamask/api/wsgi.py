"""The API as a WSGI application for gunicorn (the deployment's API containers):
``gunicorn kappamask.api.wsgi:app``.

pygeoapi configured from ``PYGEOAPI_CONFIG`` / ``PYGEOAPI_OPENAPI``, behind the same
request guard as `kappamask serve` (health endpoints, body limits). Readiness asks the
Triton of ``KAPPAMASK_TRITON_URL``. Unlike `kappamask serve`, nothing is recovered at
start-up: several API pods share one job database, and a pod that starts must not fail
the jobs another pod is running.
"""

from __future__ import annotations

import os

from kappamask.api.serve import guarded_app
from kappamask.inference.triton import server_ready

_URL = os.environ.get("KAPPAMASK_TRITON_URL", "triton:8000")
_PROTOCOL = os.environ.get("KAPPAMASK_TRITON_PROTOCOL", "http")

app = guarded_app(lambda: server_ready(_URL, _PROTOCOL))
