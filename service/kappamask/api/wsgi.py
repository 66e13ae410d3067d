"""The API as a WSGI application for gunicorn (the deployment's API containers):
``gunicorn kappamask.api.wsgi:app``.

pygeoapi configured from the settings (``kappamask.settings``: the environment), behind the
same request guard as `kappamask serve` (health endpoints, body limits). Readiness asks
the Triton of ``KAPPAMASK_TRITON_URL``, which must be set. Unlike `kappamask serve`,
nothing is recovered at start-up: several API pods share one job database, and a pod that
starts must not fail the jobs another pod is running.
"""

from __future__ import annotations

import atexit
from contextlib import ExitStack

from kappamask import settings
from kappamask.api.serve import guarded_app, prepare_pygeoapi
from kappamask.errors import ConfigurationError
from kappamask.inference.triton import server_ready
from kappamask.settings import Settings

_CONFIG = Settings.from_env()
if _CONFIG.triton_url is None:
    raise ConfigurationError("the API container needs KAPPAMASK_TRITON_URL (Triton's host:port)")
settings.use(_CONFIG)  # what the processes, the queue and the guard read
_SCRATCH = ExitStack()
atexit.register(_SCRATCH.close)
prepare_pygeoapi(_SCRATCH, _CONFIG)
_URL, _PROTOCOL = _CONFIG.triton_url, _CONFIG.triton_protocol

app = guarded_app(lambda: server_ready(_URL, _PROTOCOL))
