"""`kappamask worker`: a process that takes jobs from the queue (``kappamask.jobs.queue``) and
runs them, one at a time, with the same pygeoapi configuration as the API, so that both
read and write the same job manager, output folder and Triton.

Each worker runs one job at a time (Celery's solo pool): memory stays that of one
pipeline, and workers scale as processes (``docker compose --scale worker=N``, a
Kubernetes Deployment scaled on the queue's length). SIGTERM lets the running job finish
(Celery's warm shutdown); SIGKILL leaves it to another worker after the visibility
timeout.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from kappamask.access import roots_from_env
from kappamask.api.process import register_batch
from kappamask.api.serve import DEFAULT_CONFIG, prepare_environment, set_outputs_url
from kappamask.inference.server import triton_endpoint
from kappamask.inference.triton import TritonClient
from kappamask.jobs import queue

LOGGER = logging.getLogger(__name__)


def work(
    broker_url: str,
    triton_url: str | None,
    protocol: str,
    output_dir: Path,
    data_roots: Sequence[Path] | None,
    repository: Path,
    public_url: str,
    config: Path = DEFAULT_CONFIG,
) -> None:
    """Take jobs from the queue at ``broker_url`` until stopped; results are named by the
    API's ``public_url`` (the API serves the shared output folder)."""
    os.environ[queue.BROKER_ENV] = broker_url
    os.environ["KAPPAMASK_PUBLIC_URL"] = public_url
    os.environ[queue.WORKER_ENV] = "1"
    roots = list(data_roots) if data_roots else (roots_from_env() or [Path(".")])
    with ExitStack() as stack:
        triton = triton_endpoint(stack, triton_url, protocol, repository)
        with TritonClient(triton.url, protocol) as client:
            client.wait_ready()
        # the API's settings: its port names the OpenAPI scratch file only
        prepare_environment(config, triton.url, protocol, output_dir, roots, "0.0.0.0",
                            os.getpid())  # fmt: skip
        stack.callback(Path(os.environ["PYGEOAPI_OPENAPI"]).unlink, missing_ok=True)
        set_outputs_url()
        register_batch()  # batches split into child jobs here
        name = f"kappamask-{socket.gethostname()}-{os.getpid()}@%h"
        LOGGER.info("worker %s on the queue at %s (Triton %s)", name,
                    queue.safe_url(broker_url), triton.url)  # fmt: skip
        queue.app().worker_main(["worker", "--pool=solo", "--concurrency=1", "-Q", queue.QUEUE,
                                 "-n", name, "--without-gossip", "--without-mingle",
                                 "--without-heartbeat", "--loglevel=INFO"])  # fmt: skip
