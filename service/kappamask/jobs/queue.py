"""The job queue: Celery on a Redis broker, so that jobs run on worker processes anywhere
and survive the death of the process that ran them.

With ``KAPPAMASK_BROKER_URL`` set (``kappamask serve --broker-url``), an API process only
validates a job, records it in pygeoapi's job manager (PostgreSQL when API pods and
workers are many: every one of them answers for every job) and enqueues it; a
synchronous request waits for its job to finish. ``kappamask worker`` processes take jobs
one at a time and run them through the manager's own execution path (progress,
cancellation, results, callbacks, failures by cause), so a queued job behaves as a
threaded one does. Without a broker, ``kappamask serve`` runs jobs in its own threads as
before.

Workers acknowledge a job only when it has finished (``acks_late``): a worker killed in
the middle leaves its job unacknowledged, and Redis hands it to another worker once the
visibility timeout has passed (``KAPPAMASK_QUEUE_VISIBILITY_S``, default 3 hours: longer
than any job, or a running job would be handed out twice). The second run publishes the
same files atomically, or finds the first run's complete result and reuses it, so a
product ends with exactly one result. A job that is dismissed, or already finished, when a
worker takes it is acknowledged and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

from kombu.exceptions import OperationalError
from pygeoapi.util import JobStatus, Subscriber
from redis.exceptions import RedisError

from kappamask import settings
from kappamask.errors import (
    InferenceUnavailableError,
    InternalError,
)
from kappamask.jobs.failures import recorded_failure
from kappamask.jobs.reporting import current_manager, job_status
from kappamask.storage.sinks import remove_stale_staging

LOGGER = logging.getLogger(__name__)

QUEUE = "kappamask"
TASK = "kappamask.run_job"
FINISHED = {JobStatus.successful.value, JobStatus.failed.value, JobStatus.dismissed.value}


def broker_url() -> str | None:
    """The broker jobs are queued on, or None (jobs run in the API process's threads)."""
    return settings.current().broker_url


def in_worker() -> bool:
    return settings.current().queue_worker


def queued() -> bool:
    """Whether this process hands its jobs to the queue (an API process with a broker)."""
    return broker_url() is not None and not in_worker()


@cache
def app() -> Any:
    """The Celery application on ``broker_url()``."""
    from celery import Celery

    url = broker_url()
    if url is None:
        raise InternalError("no job queue: KAPPAMASK_BROKER_URL is not set")
    # the result backend carries a synchronous job's outcome (its error class) back to the
    # API process that waits for it
    celery = Celery("kappamask", broker=url, backend=url)
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds one job, never a backlog
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.current().queue_visibility_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_expires=24 * 3600,
        # a broker that is down is a 503 within seconds, not a request left hanging
        broker_connection_timeout=3,
        redis_socket_connect_timeout=3,
        result_backend_transport_options={"retry_policy": {"max_retries": 1}},
    )
    celery.task(name=TASK)(run_job)
    return celery


@dataclass(frozen=True)
class QueuedJob:
    """A recorded job on the queue: what a worker runs it with. Celery carries it as the
    JSON list of ``args()``, ``run_job``'s positional parameters."""

    process_id: str
    job_id: str
    data: dict[str, Any]
    requested_outputs: Any
    #: the subscriber's success, in-progress and failure URLs (None: no subscriber)
    subscriber_urls: list[str | None] | None
    requested_response: Any
    #: the batch this job is a product of
    parent: str | None = None

    def args(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    @property
    def subscriber(self) -> Subscriber | None:
        return Subscriber(*self.subscriber_urls) if self.subscriber_urls else None

    @staticmethod
    def urls_of(subscriber: Subscriber | None) -> list[str | None] | None:
        """``subscriber_urls`` of a pygeoapi Subscriber (the order ``subscriber`` reads)."""
        if subscriber is None:
            return None
        return [subscriber.success_uri, subscriber.in_progress_uri, subscriber.failed_uri]


#: How a process that splits into child jobs starts on a worker: (processor, manager, job)
#: -> whether its ``execute`` runs now (False: its children were queued and it waits).
FanOut = Callable[[Any, Any, QueuedJob], bool]
#: What a batch learns when one of its products has finished: (manager, batch id, child).
ChildFinished = Callable[[Any, str, str], None]
_FAN_OUTS: dict[type, FanOut] = {}
_CHILD_FINISHED: list[ChildFinished] = []


def register_fan_out(processor: type, hook: FanOut) -> None:
    """Jobs of ``processor`` (and its subclasses) start through ``hook`` on a worker."""
    _FAN_OUTS[processor] = hook


def on_child_finished(hook: ChildFinished) -> None:
    """``hook`` is told of every finished job that is a product of a batch."""
    if hook not in _CHILD_FINISHED:
        _CHILD_FINISHED.append(hook)


def enqueue(job: QueuedJob) -> Any:
    """Put a recorded job on the queue (its Celery AsyncResult).
    InferenceUnavailableError (503) when the broker cannot be reached."""
    try:
        return app().send_task(
            TASK,
            args=job.args(),
            task_id=job.job_id,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
        )
    except (OperationalError, RedisError, OSError, RuntimeError) as err:
        # kombu's error for the broker, redis-py's (or a refused socket, or Celery's
        # RuntimeError) for the result backend on the same server
        raise InferenceUnavailableError(
            f"the job queue at {safe_url(broker_url())} cannot be reached ({err}); try again later"
        ) from err


def safe_url(url: str | None) -> str:
    """The broker URL without its password."""
    if not url or "@" not in url:
        return str(url)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def run_job(*args: Any) -> dict[str, Any]:
    """The worker's side of a ``QueuedJob`` (its ``args()``): run the recorded job through
    the manager, as its thread would; its final status and, for a failure, the error's
    class (for a waiting API). A process registered with ``register_fan_out`` (a batch)
    starts through its hook; a product of a batch tells ``on_child_finished``'s hooks."""
    job = QueuedJob(*args)
    job_id, parent = job.job_id, job.parent
    manager = current_manager()
    if manager is None:
        raise InternalError("the worker has no pygeoapi job manager (PYGEOAPI_CONFIG)")
    status = job_status(job_id, manager)
    if status is None:  # deleted before a worker took it
        LOGGER.info("job %s is gone: dropped", job_id)
        return {"status": JobStatus.dismissed.value}
    if status in FINISHED:
        LOGGER.info("job %s is already %s: dropped", job_id, status)
        _advance(manager, parent, job_id)  # its worker may have died before it advanced
        return {"status": status}
    processor = manager.get_processor(job.process_id)
    fan_out = next((h for cls, h in _FAN_OUTS.items() if isinstance(processor, cls)), None)
    if fan_out is not None:
        if not fan_out(processor, manager, job):
            return {"status": JobStatus.running.value}
    elif status == JobStatus.running.value:
        LOGGER.warning("job %s was running on a worker that died: running it again", job_id)
        output_dir = settings.current().output_dir
        if output_dir.exists():
            remove_stale_staging(output_dir)  # what the dead worker left half-written
    processor.set_job_id(job_id)
    _fmt, _outputs, final = manager._execute_handler_sync(
        processor, job_id, job.data, job.requested_outputs, job.subscriber, job.requested_response
    )
    outcome: dict[str, Any] = {"status": str(getattr(final, "value", final))}
    err = recorded_failure(job_id)
    if err is not None:
        outcome["error"] = type(err).__name__
    _advance(manager, parent, job_id)
    return outcome


def _advance(manager: Any, parent: str | None, job_id: str) -> None:
    """Tell batch ``parent`` that its product ``job_id`` has finished; never fails the
    product's job (the batch is advanced again by its next product)."""
    if parent is None:
        return
    if not _CHILD_FINISHED:
        LOGGER.error("job %s of batch %s finished, but no batch layer listens", job_id, parent)
    for hook in _CHILD_FINISHED:
        try:
            hook(manager, parent, job_id)
        except Exception:
            LOGGER.exception("batch %s could not be advanced", parent)
