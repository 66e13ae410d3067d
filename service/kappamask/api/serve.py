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
import shutil
import signal
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from kappamask import settings
from kappamask.api import site
from kappamask.api.guard import RequestGuard
from kappamask.api.ogc import OGCAnswers, openapi_document
from kappamask.bands import LEVELS
from kappamask.errors import KappaMaskError
from kappamask.inference.model_spec import ORIGIN_OFFICIAL
from kappamask.inference.server import triton_endpoint
from kappamask.inference.triton import TritonClient
from kappamask.jobs import queue
from kappamask.jobs.reporting import fail_interrupted_jobs
from kappamask.settings import Settings
from kappamask.storage.sinks import remove_stale_staging

LOGGER = logging.getLogger(__name__)

#: The pygeoapi configuration the launchers fill in (pygeoapi-config.yml at the project's
#: root; KAPPAMASK_PYGEOAPI_CONFIG names another, e.g. a deployment's ConfigMap).
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "pygeoapi-config.yml"


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def render_config(template: Path, config: Settings) -> dict[str, Any]:
    """pygeoapi's configuration: ``template`` (its own ``${VAR}`` substituted as pygeoapi
    does) with the server's address, URL, job manager and log level from ``config``."""
    from pygeoapi.util import yaml_load

    with template.open() as fh:
        document: dict[str, Any] = yaml_load(fh)
    server = document.setdefault("server", {})
    server["bind"] = {"host": config.host, "port": config.port}
    server["url"] = config.api_url
    server["manager"] = {
        "name": config.job_manager,
        "connection": config.jobs_database,
        "output_dir": f"{config.jobs_folder}/",
    }
    document.setdefault("logging", {})["level"] = config.log_level
    return document


#: Scratch folders of pygeoapi's configuration: ``kappamask-pygeoapi-PID-*`` in the
#: temporary folder.
SCRATCH_PREFIX = "kappamask-pygeoapi-"


def remove_stale_scratch() -> None:
    """Remove the scratch folders of launchers that died without cleaning up (killed)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name.removeprefix(SCRATCH_PREFIX).partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def write_config(folder: Path, config: Settings, template: Path | None = None) -> Path:
    """pygeoapi's configuration for ``config`` (``render_config`` of ``template``, default
    the settings' own) written into ``folder``; its path."""
    template = template or config.pygeoapi_config or DEFAULT_CONFIG
    resolved = folder / "pygeoapi-config.yml"
    resolved.write_text(yaml.safe_dump(render_config(template, config), sort_keys=False))
    return resolved


def prepare_pygeoapi(stack: ExitStack, config: Settings) -> None:
    """Write pygeoapi's configuration for ``config`` and its OpenAPI document to a scratch
    folder (removed with ``stack``) and point pygeoapi at them: it reads both paths from
    the environment, and only there."""
    config.jobs_folder.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    stack.callback(shutil.rmtree, scratch, ignore_errors=True)
    resolved = write_config(scratch, config)
    openapi = scratch / "openapi.yml"
    openapi.write_text(openapi_document(resolved))
    os.environ["PYGEOAPI_CONFIG"] = str(resolved)
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
            level,
            spec.name,
            spec.version_label,
            spec.origin,
            spec.sha256 or "unrecorded",
            spec.runtime_description() or "a runtime its config does not name",
        )
        if spec.origin != ORIGIN_OFFICIAL:
            LOGGER.warning(
                "%s masks come from %s weights, not KappaZeta's published ones: run "
                "`kappamask fetch-weights` where the internet is reachable",
                level,
                spec.origin,
            )


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


def guarded_app(triton_ready: Callable[[], bool]) -> Any:
    """pygeoapi's Flask app (configured by ``prepare_pygeoapi``) behind the request guard,
    with quiet logs: what `kappamask serve` and the deployment's gunicorn
    (kappamask.api.wsgi) both serve."""
    config = settings.current()
    _quiet_logs()
    from pygeoapi.flask_app import APP, CONFIG, api_

    # the service's own page frame and pages first, pygeoapi's for the rest (kappamask.api.site)
    # (pygeoapi keeps a copy of its configuration for pages of a resource: both)
    for document in (api_.config, api_.tpl_config):
        document["server"].setdefault("templates", {})["path"] = str(site.TEMPLATES)

    if not isinstance(APP.wsgi_app, RequestGuard):
        ogc = OGCAnswers(APP.wsgi_app, CONFIG["server"]["url"])
        APP.wsgi_app = RequestGuard(
            ogc,
            triton_ready,
            config.max_request_bytes,
            config.served_outputs,
            config.read_timeout_s,
        )
    return APP


def serve(config: Settings) -> None:
    """Run the service until interrupted, with a local Triton unless ``config`` names one."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C stops the service even when it was started with SIGINT ignored (a background
    # job of a non-interactive shell, nohup): Python keeps an inherited SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ExitStack() as stack:
        triton = triton_endpoint(stack, config)
        with TritonClient(triton.url, config.triton_protocol) as client:
            try:
                client.wait_ready()
                log_served_models(client)
            except KappaMaskError as err:  # external Triton down: serve, answer 503 meanwhile
                LOGGER.error("%s: jobs fail with 503 until it answers", err)
        config = config.replace(triton_url=triton.url)
        settings.use(config)  # what the processes, the queue and the guard read
        prepare_pygeoapi(stack, config)
        recover(config.output_dir.resolve())
        app = guarded_app(triton.ready)
        from werkzeug.serving import WSGIRequestHandler, run_simple

        class TimedHandler(WSGIRequestHandler):
            # a connection that sends no (or half a) request line and headers is closed
            # after this, instead of holding its thread (the guard bounds the body)
            timeout = config.read_timeout_s

        LOGGER.info(
            "KappaMask service on http://%s:%d (Triton %s)", config.host, config.port, triton.url
        )
        try:
            run_simple(
                config.host,
                config.port,
                app,
                threaded=True,
                use_reloader=False,
                request_handler=TimedHandler,
            )
        except KeyboardInterrupt:
            LOGGER.info("stopping")
