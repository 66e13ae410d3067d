"""`kappamask serve`: pygeoapi with the kappamask process, and a local Triton unless a
URL is given. Stopping the service (Ctrl-C, SIGTERM) stops Triton too."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from kappamask.bands import LEVELS
from kappamask.errors import KappaMaskError
from kappamask.inference.model_spec import ORIGIN_OFFICIAL
from kappamask.inference.repository import DEFAULT_REPOSITORY
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient

LOGGER = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "pygeoapi-config.yml"


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
    from pygeoapi.openapi import generate_openapi_document

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
    openapi.write_text(generate_openapi_document(config, "yaml"))
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
            "%s: %s %s, %s weights, ONNX sha256 %s",
            level, spec.name, spec.version_label, spec.origin, spec.sha256 or "unrecorded",
        )  # fmt: skip
        if spec.origin != ORIGIN_OFFICIAL:
            LOGGER.warning(
                "%s masks come from %s weights, not KappaZeta's published ones: run "
                "`kappamask fetch-weights` where the internet is reachable",
                level, spec.origin,
            )  # fmt: skip


def serve(
    host: str = "127.0.0.1",
    port: int = 5000,
    triton_url: str | None = None,
    protocol: str = "http",
    output_dir: Path = Path("kappamask-results"),
    data_roots: Sequence[Path] = (Path("."),),
    config: Path = DEFAULT_CONFIG,
    repository: Path = DEFAULT_REPOSITORY,
) -> None:
    """Run the service until interrupted."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with ExitStack() as stack:
        if triton_url is None:
            triton = stack.enter_context(LocalTriton(repository))
            triton_url = triton.grpc_url if protocol == "grpc" else triton.http_url
        with TritonClient(triton_url, protocol) as client:
            client.wait_ready()
            log_served_models(client)
        prepare_environment(config, triton_url, protocol, output_dir, data_roots, host, port)
        stack.callback(Path(os.environ["PYGEOAPI_OPENAPI"]).unlink, missing_ok=True)
        from pygeoapi.flask_app import APP
        from werkzeug.serving import run_simple

        LOGGER.info("KappaMask service on http://%s:%d (Triton %s)", host, port, triton_url)
        try:
            run_simple(host, port, APP, threaded=True, use_reloader=False)
        except KeyboardInterrupt:
            LOGGER.info("stopping")
