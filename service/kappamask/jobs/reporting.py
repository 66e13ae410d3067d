"""What a running job tells pygeoapi's job manager, and what it learns from it.

pygeoapi runs async jobs in threads it never stops and only writes a job's progress
before and after ``execute``. So the process writes its own progress (5..95 % as crops
complete) with the manager's ``update_job``, treats a job that has disappeared from the
manager (DELETE /jobs/{id}) or was dismissed as cancelled, and waits for a free inference
slot so that many submitted jobs never run as many pipelines at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from kappamask.errors import CancelledError

LOGGER = logging.getLogger(__name__)

_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()
_MANAGER: Any = None
_MANAGER_LOCK = threading.Lock()
#: Seconds between looks at the job while waiting for a slot.
_POLL_S = 0.5
#: What pygeoapi reports for an accepted job.
ACCEPTED_PROGRESS = 5


def current_manager() -> Any:
    """pygeoapi's job manager of this server (None outside a pygeoapi server)."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            try:
                from pygeoapi.config import get_config
                from pygeoapi.process.manager.base import get_manager

                _MANAGER = get_manager(get_config())
            except Exception as err:  # no pygeoapi config: progress goes to the log only
                LOGGER.warning("no pygeoapi job manager, progress is logged only: %s", err)
                _MANAGER = False
        return _MANAGER or None


def find_job(job_id: str, manager: Any = None) -> dict[str, Any] | None:
    """Job ``job_id``'s record; None when there is no such job (or no job manager)."""
    manager = manager if manager is not None else current_manager()
    if manager is None:
        return None
    try:
        job = manager.get_job(job_id)
    except Exception:  # JobNotFoundError, a database that does not answer: no such job here
        return None
    return dict(job or {})


def job_status(job_id: str, manager: Any = None) -> str | None:
    """The status of job ``job_id``; None when there is no such job (or no job manager)."""
    job = find_job(job_id, manager)
    return str((job or {}).get("status") or "") or None


def now() -> str:
    """The time now as pygeoapi writes it in job records (UTC, microseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JobReporter:
    """Progress and cancellation of one pygeoapi job (log only when there is none)."""

    def __init__(self, job_id: str | None, manager: Any = None) -> None:
        self.job_id = job_id
        self.manager = manager if manager is not None else (current_manager() if job_id else None)
        self._last: tuple[int, str] | None = None
        #: What the job works on (the product), named in every message: a job's page and
        #: its status say which product it is.
        self.subject: str | None = None

    def update(self, percent: int, message: str, status: str = "running") -> None:
        """Write progress to the job (only when the percentage changes)."""
        if (percent, status) == self._last:
            return
        if self.subject:
            message = f"{self.subject}: {message}"
        self._last = (percent, status)
        LOGGER.info("job %s: %d%% %s", self.job_id or "-", percent, message)
        if self.manager is None or self.job_id is None:
            return
        try:
            self.manager.update_job(
                self.job_id,
                {"status": status, "progress": int(percent), "message": message, "updated": now()},
            )
        except Exception as err:  # progress must never fail a job
            LOGGER.warning("cannot update job %s: %s", self.job_id, err)

    def cancelled(self) -> bool:
        """Whether the job was deleted or dismissed through the API."""
        if self.manager is None or self.job_id is None:
            return False
        # gone (DELETE /jobs/{id} removed it) or dismissed
        return job_status(self.job_id, self.manager) in (None, "dismissed")


#: What a job left accepted or running by a process that died is marked with.
INTERRUPTED_MESSAGE = (
    "NoApplicableCode: interrupted: the service restarted while the job ran; nothing was "
    "published, submit it again"
)


def fail_interrupted_jobs(manager: Any) -> list[str]:
    """Mark failed every job a previous process left ``accepted`` or ``running`` (called at
    start-up, before this process accepts any job); the ids of those jobs."""
    interrupted = []
    for job in manager.get_jobs().get("jobs", []):
        if str(job.get("status")) in ("accepted", "running"):
            job_id = str(job["identifier"])
            manager.update_job(
                job_id,
                {
                    "status": "failed",
                    "message": INTERRUPTED_MESSAGE,
                    "updated": now(),
                    "finished": now(),
                },
            )
            interrupted.append(job_id)
    if interrupted:
        LOGGER.warning(
            "%d job(s) interrupted by the last shutdown marked failed: %s",
            len(interrupted),
            ", ".join(interrupted),
        )
    return interrupted


@contextmanager
def inference_slot(limit: int, job: JobReporter) -> Iterator[None]:
    """Hold one of ``limit`` pipeline slots of this API process; the job stays accepted
    (and may be cancelled) while it waits."""
    with _SLOTS_LOCK:
        slots = _SLOTS.setdefault(limit, threading.BoundedSemaphore(limit))
    waited = False
    while not slots.acquire(timeout=_POLL_S):
        if not waited:
            job.update(ACCEPTED_PROGRESS, "waiting for a free inference slot", status="accepted")
            waited = True
        if job.cancelled():
            raise CancelledError("job cancelled while waiting")
    started = time.monotonic()
    try:
        yield
    finally:
        slots.release()
        LOGGER.debug("slot held %.1f s", time.monotonic() - started)
