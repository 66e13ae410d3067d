"""`kappamask serve`: pygeoapi with the kappamask process, and a local Triton unless a
URL is given. Stopping the service (Ctrl-C, SIGTERM) stops Triton too.

At start-up the service cleans up after a previous process that died: jobs it left
accepted or running are marked failed and its staging folders are removed. A local
Triton is supervised (restarted when it dies); an external one (``--triton-url``) may be
down at start-up: jobs then fail with 503 until it answers. ``/health/ready`` says which.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

from kappamask.access import roots_from_env
from kappamask.api import site
from kappamask.api.guard import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    MAX_BODY_ENV,
    OUTPUTS_ROUTE,
    READ_TIMEOUT_ENV,
    RequestGuard,
)
from kappamask.api.ogc import OGCAnswers, openapi_document
from kappamask.bands import LEVELS
from kappamask.errors import KappaMaskError
from kappamask.inference.model_spec import ORIGIN_OFFICIAL
from kappamask.inference.repository import DEFAULT_REPOSITORY
from kappamask.inference.server import triton_endpoint
from kappamask.inference.triton import TritonClient
from kappamask.jobs import queue
from kappamask.jobs.reporting import fail_interrupted_jobs
from kappamask.storage.sinks import remove_stale_staging

LOGGER = logging.getLogger(__name__)

#: "false": the output folder is not served at /outputs (results name server paths).
SERVE_OUTPUTS_ENV = "KAPPAMASK_SERVE_OUTPUTS"
#: The URL of the served output folder, as results name their files.
OUTPUTS_URL_ENV = "KAPPAMASK_OUTPUTS_URL"

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "pygeoapi-config.yml"


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def prepare_environment(
    config: Path,
    triton_url: str,
    protocol: str,
    output_dir: Path,
    data_roots: Sequence[Path],
    host: str,
    port: int,
) -> None:
    """Set what pygeoapi-config.yml substitutes, and write the OpenAPI document pygeoapi needs."""
    os.environ.update(
        {
            "KAPPAMASK_TRITON_URL": triton_url,
            "KAPPAMASK_TRITON_PROTOCOL": protocol,
            "KAPPAMASK_OUTPUT_DIR": str(output_dir.resolve()),
            "KAPPAMASK_DATA_ROOTS": ":".join(str(p.resolve()) for p in data_roots),
            "KAPPAMASK_HOST": host,
            "KAPPAMASK_PORT": str(port),
        }
    )
    os.environ.setdefault("KAPPAMASK_PUBLIC_URL", f"http://localhost:{port}")
    # pygeoapi's job manager needs an existing folder for job results and its database.
    jobs = output_dir.resolve() / ".jobs"
    os.environ.setdefault("KAPPAMASK_JOB_OUTPUT_DIR", str(jobs))
    os.environ.setdefault("KAPPAMASK_JOBS_DB", str(jobs / "jobs.tinydb"))
    Path(os.environ["KAPPAMASK_JOB_OUTPUT_DIR"]).mkdir(parents=True, exist_ok=True)
    openapi = Path(tempfile.gettempdir()) / f"kappamask-openapi-{port}.yml"
    openapi.write_text(openapi_document(config))
    os.environ["PYGEOAPI_CONFIG"] = str(config.resolve())
    os.environ["PYGEOAPI_OPENAPI"] = str(openapi)


def log_served_models(client: TritonClient) -> None:
    """Say at start-up which weights answer for each level, and warn where they are not
    KappaZeta's published ones."""
    for level in LEVELS:
        try:
            spec = client.model(level)
        except KappaMaskError as err:
            LOGGER.warning("%s: %s", level, err)
            continue
        LOGGER.info(
            "%s: %s %s, %s weights, ONNX sha256 %s, runs on %s",
            level, spec.name, spec.version_label, spec.origin, spec.sha256 or "unrecorded",
            spec.runtime_description() or "a runtime its config does not name",
        )  # fmt: skip
        if spec.origin != ORIGIN_OFFICIAL:
            LOGGER.warning(
                "%s masks come from %s weights, not KappaZeta's published ones: run "
                "`kappamask fetch-weights` where the internet is reachable",
                level, spec.origin,
            )  # fmt: skip


def recover(output_dir: Path) -> None:
    """Clean up after a previous process of this service that died: its jobs left
    accepted/running are marked failed, its staging folders removed."""
    from kappamask.jobs.reporting import current_manager

    manager = current_manager()
    if queue.broker_url() is not None:
        # queued jobs belong to the workers: one that dies has its job run by another
        LOGGER.info("jobs run on the queue at %s", queue.safe_url(queue.broker_url()))
    elif manager is not None:
        fail_interrupted_jobs(manager)
    if output_dir.exists():
        remove_stale_staging(output_dir)


class _ClientErrorTracebacks(logging.Filter):
    """No traceback for a request that failed on the client's mistake (4xx): pygeoapi logs
    one per failed execution, twice; the line stays, a server-side failure keeps its
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        status = getattr(err, "http_status_code", None)
        if status is not None and int(status) < 500:
            record.exc_info, record.exc_text = None, None
        return True


class _NoOffsetWarning(logging.Filter):
    """pygeoapi 0.21 warns "int() argument must be ... not 'NoneType'" on every GET /jobs
    without an ``offset`` (every poll of a job), then uses 0, as it should."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("int() argument must be")


def _quiet_logs() -> None:
    """No log line per request that an operator cannot act on."""
    # pygeoapi warns for every translatable string when a request's language is unknown
    logging.getLogger("pygeoapi.l10n").setLevel(logging.ERROR)
    logging.getLogger("pygeoapi.api.processes").addFilter(_NoOffsetWarning())
    for name in ("pygeoapi.api", "pygeoapi.process.manager.base"):
        logging.getLogger(name).addFilter(_ClientErrorTracebacks())


def served_outputs() -> Path | None:
    """The output folder the service serves at /outputs (KAPPAMASK_OUTPUT_DIR, unless
    KAPPAMASK_SERVE_OUTPUTS is false: results on S3, or a web server of its own)."""
    folder = os.environ.get("KAPPAMASK_OUTPUT_DIR")
    if not folder or os.environ.get(SERVE_OUTPUTS_ENV, "true").lower() in ("false", "0", "no"):
        return None
    return Path(folder).resolve()


def set_outputs_url() -> Path | None:
    """Where results are named from (pygeoapi-config.yml: outputs_url): the API's public
    URL of the served output folder. Set before pygeoapi reads its configuration, in the
    API and in the queue's workers alike; the served folder, if any."""
    outputs = served_outputs()
    if outputs is not None:
        public = os.environ.get("KAPPAMASK_PUBLIC_URL", "http://localhost:5000").rstrip("/")
        os.environ.setdefault(OUTPUTS_URL_ENV, public + OUTPUTS_ROUTE)
    return outputs


def guarded_app(triton_ready: Callable[[], bool]) -> Any:
    """pygeoapi's Flask app (configured from the environment) behind the request guard,
    with quiet logs: what `kappamask serve` and the deployment's gunicorn (kappamask.api.wsgi)
    both serve."""
    _quiet_logs()
    outputs = set_outputs_url()
    from pygeoapi.flask_app import APP, CONFIG, api_

    # the service's own page frame and pages first, pygeoapi's for the rest (kappamask.api.site)
    # (pygeoapi keeps a copy of its configuration for pages of a resource: both)
    for config in (api_.config, api_.tpl_config):
        config["server"].setdefault("templates", {})["path"] = str(site.TEMPLATES)

    limit = int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES)
    if not isinstance(APP.wsgi_app, RequestGuard):
        ogc = OGCAnswers(APP.wsgi_app, CONFIG["server"]["url"])
        APP.wsgi_app = RequestGuard(ogc, triton_ready, limit, outputs, read_timeout())
    return APP


def read_timeout() -> float:
    """Seconds a request (its headers, then its whole body) may take to arrive."""
    return float(os.environ.get(READ_TIMEOUT_ENV) or DEFAULT_READ_TIMEOUT_S)


def serve(
    host: str = "127.0.0.1",
    port: int = 5000,
    triton_url: str | None = None,
    protocol: str = "http",
    output_dir: Path = Path("kappamask-results"),
    data_roots: Sequence[Path] | None = None,
    config: Path = DEFAULT_CONFIG,
    repository: Path = DEFAULT_REPOSITORY,
) -> None:
    """Run the service until interrupted. ``data_roots`` None: ``KAPPAMASK_DATA_ROOTS``
    if set, else the current folder."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C stops the service even when it was started with SIGINT ignored (a background
    # job of a non-interactive shell, nohup): Python keeps an inherited SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    roots = list(data_roots) if data_roots else (roots_from_env() or [Path(".")])
    with ExitStack() as stack:
        triton = triton_endpoint(stack, triton_url, protocol, repository)
        with TritonClient(triton.url, protocol) as client:
            try:
                client.wait_ready()
                log_served_models(client)
            except KappaMaskError as err:  # external Triton down: serve, answer 503 meanwhile
                LOGGER.error("%s: jobs fail with 503 until it answers", err)
        prepare_environment(config, triton.url, protocol, output_dir, roots, host, port)
        stack.callback(Path(os.environ["PYGEOAPI_OPENAPI"]).unlink, missing_ok=True)
        recover(output_dir.resolve())
        app = guarded_app(triton.ready)
        from werkzeug.serving import WSGIRequestHandler, run_simple

        class TimedHandler(WSGIRequestHandler):
            # a connection that sends no (or half a) request line and headers is closed
            # after this, instead of holding its thread (the guard bounds the body)
            timeout = read_timeout()

        LOGGER.info("KappaMask service on http://%s:%d (Triton %s)", host, port, triton.url)
        try:
            run_simple(host, port, app, threaded=True, use_reloader=False,
                       request_handler=TimedHandler)  # fmt: skip
        except KeyboardInterrupt:
            LOGGER.info("stopping")
