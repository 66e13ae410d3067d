"""Why a job failed, in one place: the error a job raised is recorded for a synchronous
request waiting on it (in this process), written into the job's status as
``"<OGC code>: <message>"``, read back from there (a queued job's waiting API process),
and turned into pygeoapi's exception with our HTTP status and OGC code."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from pygeoapi.process.base import ProcessorExecuteError
from pygeoapi.util import JobStatus

from kappamask import errors
from kappamask.errors import CancelledError, InternalError, KappaMaskError

_FAILURES: OrderedDict[str, KappaMaskError] = OrderedDict()
_LOCK = threading.Lock()
#: Failures kept for jobs nobody asks about (asynchronous ones): the newest few only.
_KEEP = 256


def record_failure(job_id: str | None, err: KappaMaskError) -> None:
    """Remember why job ``job_id`` failed, for the synchronous response."""
    if job_id is None:
        return
    with _LOCK:
        _FAILURES[job_id] = err
        while len(_FAILURES) > _KEEP:
            _FAILURES.popitem(last=False)


def recorded_failure(job_id: str) -> KappaMaskError | None:
    """The error recorded for job ``job_id`` in this process, if any."""
    with _LOCK:
        return _FAILURES.get(job_id)


def take_failure(job_id: str) -> KappaMaskError | None:
    """The error recorded for job ``job_id``, forgotten (a synchronous answer was made)."""
    with _LOCK:
        return _FAILURES.pop(job_id, None)


def to_process_error(err: KappaMaskError) -> ProcessorExecuteError:
    """A pygeoapi error carrying our message, HTTP status and OGC code."""
    out = ProcessorExecuteError(user_msg=str(err))
    out.http_status_code = err.http_status
    out.ogc_exception_code = err.ogc_code
    return out


def failure_message(err: KappaMaskError) -> str:
    """What a failed job's status says: the OGC code of the cause, then its message."""
    return f"{err.ogc_code}: {err}"


def message_text(message: str) -> str:
    """A failed job's message without the OGC code ``failure_message`` put before it."""
    code, _, text = message.partition(": ")
    return text if code in {"NoApplicableCode", "InvalidParameterValue"} else message


def error_from(outcome: Any, job: dict[str, Any]) -> KappaMaskError:
    """The error of a queued job that did not succeed, as its worker raised it (class and
    message), for the API's answer to a synchronous request."""
    text = message_text(str(job.get("message") or "the job did not finish"))
    name = outcome.get("error") if isinstance(outcome, dict) else None
    cls = getattr(errors, str(name), None)
    if isinstance(cls, type) and issubclass(cls, KappaMaskError):
        return cls(text)
    if str(job.get("status")) == JobStatus.dismissed.value:
        return CancelledError(text)
    return InternalError(text)
