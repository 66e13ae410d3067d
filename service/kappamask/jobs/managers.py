"""pygeoapi job managers that report a failure by its cause, and remember dismissals.

pygeoapi's managers catch every exception of ``execute``, mark the job failed with
"InvalidParameterValue: Error executing process: ..." whatever the cause, and answer a
synchronous failure with 400. The process records its KappaMaskError per job
(``kappamask.jobs.failures``); these managers then

- write the failed job's message as ``<OGC code>: <message>`` of that error (a server-side
  failure reads NoApplicableCode and names the part that failed);
- raise it again for a synchronous execution, as a ``ProcessorExecuteError`` carrying the
  error's own HTTP status (404 missing product, 403 refused path, 503 Triton down, ...);
- keep a dismissed job as a record with status ``dismissed`` (OGC API - Processes),
  so that polling it answers what happened instead of a bare 404;
- check the callback URLs of a ``subscriber`` when the job is submitted and send its
  callbacks themselves (``kappamask.jobs.callbacks``): the failure callback after the failure's
  message is known, and none of them able to fail the job.

Configure them by dotted name: ``kappamask.jobs.managers.TinyDBManager`` or
``kappamask.jobs.managers.PostgreSQLManager``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pygeoapi.process.manager.tinydb_ import TinyDBManager as _TinyDBManager
from pygeoapi.util import JobStatus, Subscriber, get_current_datetime

from kappamask.api.ogc import DOCUMENT, RAW, DocumentedProcessor
from kappamask.errors import KappaMaskError
from kappamask.jobs import fanout, queue
from kappamask.jobs.callbacks import JobSubscriber, check_subscriber, deliver
from kappamask.jobs.failures import (
    error_from,
    failure_message,
    record_failure,
    recorded_failure,
    take_failure,
    to_process_error,
)
from kappamask.storage.sinks import delete_published, service_target

LOGGER = logging.getLogger(__name__)

#: Seconds between looks at a queued batch a synchronous request waits for.
WAIT_POLL_S = 1.0


class ErrorStatusMixin:
    """Failures by cause, dismissals remembered (see the module docstring)."""

    def _execute_handler_async(self, p: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        if not queue.queued():
            return super()._execute_handler_async(p, job_id, *args, **kwargs)  # type: ignore[misc]
        self._enqueue(p, job_id, *args, **kwargs)
        return "application/json", None, JobStatus.accepted

    def _enqueue(
        self,
        p: Any,
        job_id: str,
        data_dict: dict[str, Any],
        requested_outputs: Any = None,
        subscriber: Subscriber | None = None,
        requested_response: Any = RAW,
    ) -> Any:
        """Queue a recorded job; a broker that cannot be reached fails it (503)."""
        urls = queue.QueuedJob.urls_of(subscriber)
        job = queue.QueuedJob(
            str(p.metadata["id"]), job_id, data_dict, requested_outputs, urls, requested_response
        )
        try:
            return queue.enqueue(job)
        except KappaMaskError as err:
            now = get_current_datetime()
            self.update_job(
                job_id,
                {
                    "status": JobStatus.failed.value,
                    "updated": now,
                    "finished": now,
                    "message": failure_message(err),
                },
            )
            raise to_process_error(err) from err

    def _wait_for_queued(self, p: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        """A synchronous request to the API of a queue: a worker runs the job, this
        request waits for it and answers as if it had run it."""
        outcome = self._enqueue(p, job_id, *args, **kwargs).get(propagate=False)
        job = dict(self.get_job(job_id))  # type: ignore[attr-defined]
        while str(job.get("status")) not in queue.FINISHED:  # a batch: its children run on
            time.sleep(WAIT_POLL_S)
            job = dict(self.get_job(job_id))  # type: ignore[attr-defined]
        if job.get("status") == JobStatus.successful.value:
            mimetype, outputs = self.get_job_result(job_id)  # type: ignore[attr-defined]
            return mimetype, outputs, JobStatus.successful
        err = error_from(outcome, job)
        record_failure(job_id, err)
        return (
            "application/json",
            {"type": err.ogc_code, "code": err.ogc_code, "description": str(err)},
            JobStatus.failed,
        )

    def _execute_handler_sync(
        self,
        p: Any,
        job_id: str,
        data_dict: dict[str, Any],
        requested_outputs: Any = None,
        subscriber: Subscriber | None = None,
        requested_response: Any = RAW,
    ) -> Any:
        if queue.queued():
            return self._wait_for_queued(
                p, job_id, data_dict, requested_outputs, subscriber, requested_response
            )
        if isinstance(subscriber, Subscriber):  # bind it to this job
            policy = service_target().policy
            process_id = str(p.metadata.get("id", ""))
            subscriber = JobSubscriber.bind(subscriber, job_id, process_id, policy)
        # a document is OGC's results document, recorded as such (kappamask.api.ogc); pygeoapi
        # itself would record and answer {"outputs": [...]}
        runs = DocumentedProcessor(p) if requested_response == DOCUMENT else p
        jfmt, outputs, status = super()._execute_handler_sync(  # type: ignore[misc]
            runs,
            job_id,
            data_dict,
            requested_outputs,
            subscriber=subscriber,
            requested_response=RAW,
        )
        subject = getattr(p, "subject", None)
        if status == JobStatus.successful and subject:  # pygeoapi wrote "Job complete"
            self.update_job(job_id, {"message": f"{subject}: done"})
        if status == JobStatus.failed:
            err = recorded_failure(job_id)
            message = str(outputs.get("description", "")) if isinstance(outputs, dict) else ""
            if err is not None:
                outputs = {"type": err.ogc_code, "code": err.ogc_code, "description": str(err)}
                message = failure_message(err)
                self.update_job(job_id, {"message": message})
            if isinstance(subscriber, JobSubscriber):
                info = subscriber.status_info(JobStatus.failed.value, message)
                deliver(subscriber.failed_uri, info, subscriber.policy)
        return jfmt, outputs, status

    def _send_in_progress_notification(self, subscriber: Subscriber | None) -> None:
        if isinstance(subscriber, JobSubscriber):
            info = subscriber.status_info(JobStatus.running.value, "job started", 0)
            deliver(subscriber.in_progress_uri, info, subscriber.policy)

    def _send_success_notification(self, subscriber: Subscriber | None, outputs: Any) -> None:
        if isinstance(subscriber, JobSubscriber):
            deliver(subscriber.success_uri, outputs, subscriber.policy)

    def _send_failed_notification(self, subscriber: Subscriber | None) -> None:
        """Sent by ``_execute_handler_sync`` once the failure's cause is known."""

    def delete_job(self, job_id: str) -> bool:
        """Dismiss a job: it stays listed as ``dismissed`` (updated in place, so that a poll
        during the dismissal never sees it missing), a running one stops at its next
        look, and a finished one's published files and pygeoapi's result record are
        deleted."""
        job = dict(self.get_job(job_id))  # type: ignore[attr-defined]
        if job.get("status") == JobStatus.dismissed.value:
            return True  # dismissing twice is no error
        result = self._result_of(job) if job.get("status") == JobStatus.successful.value else None
        now = get_current_datetime()
        dismissed = {
            "status": JobStatus.dismissed.value,
            "message": "dismissed by request",
            "location": None,
            "updated": now,
            "finished": job.get("finished") or now,
        }
        super().update_job(job_id, dismissed)  # type: ignore[misc]
        if result is not None:
            deleted = delete_published(result, service_target())
            LOGGER.info("job %s dismissed: %d published file(s) deleted", job_id, len(deleted))
        location = job.get("location")
        if location:
            Path(str(location)).unlink(missing_ok=True)
        if queue.broker_url() is not None:
            self._dismiss_children(job_id)
        return True

    @staticmethod
    def _result_of(job: dict[str, Any]) -> Any:
        """A finished job's result, as pygeoapi recorded it (None when unreadable)."""
        try:
            return json.loads(Path(str(job.get("location"))).read_text())
        except (OSError, ValueError, TypeError):
            return None

    def _dismiss_children(self, job_id: str) -> None:
        """A dismissed batch on the queue: its products' jobs are dismissed too (queued
        ones are dropped by the worker that takes them, running ones stop)."""
        try:
            fanout.dismiss_children(self, job_id)
        except Exception:  # the queue's Redis: the batch itself is dismissed all the same
            LOGGER.exception("the child jobs of batch %s could not be dismissed", job_id)

    def update_job(self, job_id: str, update_dict: dict[str, Any]) -> bool:
        # a dismissed job's thread may still report (its last progress, its end, even on
        # another machine's worker): the dismissal stands. One conditional write, not a
        # read then a write, so that a dismissal landing in between is never overwritten.
        return self._write_unless_dismissed(job_id, update_dict)

    def _write_unless_dismissed(self, job_id: str, update_dict: dict[str, Any]) -> bool:
        raise NotImplementedError

    def execute_process(self, *args: Any, **kwargs: Any) -> Any:
        """Check what can be checked before a job exists: the callback URLs and, for a
        process with ``prepare`` (a batch: its search), its inputs; refused -> 4xx/5xx,
        no job."""
        subscriber = kwargs.get("subscriber")
        if subscriber is None:  # positional: (process_id, data, mode, outputs, subscriber, ...)
            subscriber = next((a for a in args if isinstance(a, Subscriber)), None)
        process_id = kwargs.get("process_id", args[0] if args else None)
        data = kwargs.get("data_dict", args[1] if len(args) > 1 else None)
        if process_id is not None:
            processor = self.get_processor(process_id)  # type: ignore[attr-defined]
            policy = service_target().policy
            prepare = getattr(processor, "prepare", None)
            try:
                if subscriber is not None:
                    check_subscriber(subscriber, policy)
                if prepare is not None and isinstance(data, dict):
                    prepare(data)
            except KappaMaskError as refused:
                raise to_process_error(refused) from refused
        result = super().execute_process(*args, **kwargs)  # type: ignore[misc]
        job_id, _mime, _outputs, status, _headers = result
        err = take_failure(job_id)
        if status == JobStatus.failed and err is not None:
            raise to_process_error(err)
        return result


class TinyDBManager(ErrorStatusMixin, _TinyDBManager):
    """pygeoapi's TinyDB manager (one API process) with our error statuses."""

    def _write_unless_dismissed(self, job_id: str, update_dict: dict[str, Any]) -> bool:
        import tinydb

        job = tinydb.where("identifier") == job_id
        with self._db() as db:  # under the database's file lock
            return bool(db.update(update_dict, job & (tinydb.where("status") != _DISMISSED)))


_DISMISSED = JobStatus.dismissed.value


def _postgresql_write_unless_dismissed(self: Any, job_id: str, update_dict: dict[str, Any]) -> bool:
    """One UPDATE ... WHERE status <> 'dismissed' (pygeoapi's PostgreSQL manager's table)."""
    from pygeoapi.process.base import ProcessorGenericError
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    table = self.table_model
    stmt = (
        update(table)
        .where(getattr(table, self.id_field) == job_id)
        .where(table.status != _DISMISSED)
        .values(**update_dict)
    )
    with Session(self._engine) as session:
        try:
            result = session.execute(stmt)
            session.commit()
        except Exception as err:
            session.rollback()
            raise ProcessorGenericError(f"job update failed: {err}") from err
    return bool(getattr(result, "rowcount", 0) == 1)


def __getattr__(name: str) -> Any:
    # The PostgreSQL manager needs sqlalchemy/psycopg2 (the `server` extra): imported only
    # when a configuration names it.
    if name == "PostgreSQLManager":
        from pygeoapi.process.manager.postgresql import PostgreSQLManager as _Base

        cls = type(
            name,
            (ErrorStatusMixin, _Base),
            {
                "__module__": __name__,
                "__doc__": "pygeoapi's PostgreSQL manager (several workers), our statuses.",
                "_write_unless_dismissed": _postgresql_write_unless_dismissed,
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(name)
