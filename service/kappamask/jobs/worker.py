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
from contextlib import ExitStack

from kappamask import settings
from kappamask.api.process import register_batch
from kappamask.api.serve import prepare_pygeoapi
from kappamask.errors import ConfigurationError
from kappamask.inference.server import triton_endpoint
from kappamask.inference.triton import TritonClient
from kappamask.jobs import queue
from kappamask.settings import Settings

LOGGER = logging.getLogger(__name__)


def work(config: Settings) -> None:
    """Take jobs from the queue at ``config.broker_url`` until stopped; results are named by
    the API's public URL (the API serves the shared output folder)."""
    if config.broker_url is None:
        raise ConfigurationError("a worker needs the job queue: KAPPAMASK_BROKER_URL")
    with ExitStack() as stack:
        triton = triton_endpoint(stack, config)
        with TritonClient(triton.url, config.triton_protocol) as client:
            client.wait_ready()
        # the API's settings, with jobs run here rather than queued
        config = config.replace(triton_url=triton.url, queue_worker=True)
        settings.use(config)  # what the processes and the queue read
        prepare_pygeoapi(stack, config)
        register_batch()  # batches split into child jobs here
        name = f"kappamask-{socket.gethostname()}-{os.getpid()}@%h"
        LOGGER.info(
            "worker %s on the queue at %s (Triton %s)",
            name,
            queue.safe_url(config.broker_url),
            triton.url,
        )
        queue.app().worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "-Q",
                queue.QUEUE,
                "-n",
                name,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
            ]
        )
