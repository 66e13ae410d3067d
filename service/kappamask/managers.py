"""pygeoapi job managers that answer a failed synchronous execution with the failure's
own HTTP status and OGC code (404 for a missing product, 403 for a refused path, 503
when Triton is down, ...) instead of pygeoapi's blanket 400.

pygeoapi's managers catch every exception of ``execute`` and mark the job failed; the
process records its KappaMaskError per job (``record_failure``) and these managers raise
it again, as a ``ProcessorExecuteError``, once the synchronous handler has returned. The
job itself stays recorded as failed, as pygeoapi does it. Configure them by dotted name:
``kappamask.managers.TinyDBManager`` or ``kappamask.managers.PostgreSQLManager``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from pygeoapi.process.base import ProcessorExecuteError
from pygeoapi.process.manager.tinydb_ import TinyDBManager as _TinyDBManager
from pygeoapi.util import JobStatus

from kappamask.errors import KappaMaskError

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


def to_process_error(err: KappaMaskError) -> ProcessorExecuteError:
    """A pygeoapi error carrying our message, HTTP status and OGC code."""
    out = ProcessorExecuteError(user_msg=str(err))
    out.http_status_code = err.http_status
    out.ogc_exception_code = err.ogc_code
    return out


class ErrorStatusMixin:
    """Raise a synchronous job's recorded failure with its own status code."""

    def execute_process(self, *args: Any, **kwargs: Any) -> Any:
        result = super().execute_process(*args, **kwargs)  # type: ignore[misc]
        job_id, _mime, _outputs, status, _headers = result
        with _LOCK:
            err = _FAILURES.pop(job_id, None)
        if status == JobStatus.failed and err is not None:
            raise to_process_error(err)
        return result


class TinyDBManager(ErrorStatusMixin, _TinyDBManager):
    """pygeoapi's TinyDB manager (one API process) with our error statuses."""


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
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(name)
