"""OGC API - Processes callbacks: the ``subscriber`` of an execute request.

A client names up to three URLs (``successUri``, ``inProgressUri``, ``failedUri``); the
service POSTs JSON to them as the job starts, succeeds or fails: the job's status document
(``statusInfo``) when it starts and when it fails, its results when it succeeds. The URLs
pass the same policy as product URLs (``AccessPolicy.url``: http(s) only, allowed hosts,
no loopback or private address unless the server allows them), checked when the job is
submitted, so a refused URL is a 400/403 before any work, and again before each POST, so
a name that resolves elsewhere by then is not followed. Redirects are not followed either.

A callback that cannot be delivered never changes the job: it is retried a few times on a
connection error or a 5xx answer, then logged and dropped; the job's status stays what it
was (pygeoapi's own notifications raise inside the job and mark a finished job failed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import requests
from pygeoapi.util import Subscriber

from kappamask.access import AccessPolicy
from kappamask.errors import KappaMaskError

LOGGER = logging.getLogger(__name__)

#: Seconds one POST may take (connect and read).
TIMEOUT_S = 10.0
#: POSTs per callback before it is dropped, and the pause before the second one (doubled
#: before each further one).
ATTEMPTS = 3
FIRST_PAUSE_S = 1.0


def subscriber_urls(subscriber: Subscriber | None) -> list[str]:
    """The callback URLs a subscriber names."""
    if subscriber is None:
        return []
    urls = (subscriber.success_uri, subscriber.in_progress_uri, subscriber.failed_uri)
    return [url for url in urls if url]


def check_subscriber(subscriber: Subscriber | None, policy: AccessPolicy) -> None:
    """Raise the policy's error (InvalidInputError 400, AccessDeniedError 403, ...) for
    the first callback URL it refuses."""
    for url in subscriber_urls(subscriber):
        try:
            policy.url(url)
        except KappaMaskError as err:
            raise type(err)(f"subscriber: {err}") from err


@dataclass(frozen=True)
class JobSubscriber(Subscriber):
    """A job's callback URLs with what sending to them needs: the job and the policy."""

    job_id: str = ""
    process_id: str = ""
    policy: AccessPolicy | None = None

    @classmethod
    def bind(
        cls, subscriber: Subscriber, job_id: str, process_id: str, policy: AccessPolicy | None
    ) -> JobSubscriber:
        return cls(
            subscriber.success_uri,
            subscriber.in_progress_uri,
            subscriber.failed_uri,
            job_id,
            process_id,
            policy,
        )

    def status_info(self, status: str, message: str, progress: int | None = None) -> dict[str, Any]:
        """The job's OGC statusInfo document."""
        info: dict[str, Any] = {
            "jobID": self.job_id,
            "processID": self.process_id,
            "type": "process",
            "status": status,
            "message": message,
        }
        if progress is not None:
            info["progress"] = progress
        return info


def deliver(url: str | None, payload: Any, policy: AccessPolicy | None) -> bool:
    """POST ``payload`` as JSON to ``url``; whether a 2xx answer came. Never raises."""
    if not url:
        return False
    pause = FIRST_PAUSE_S
    for attempt in range(1, ATTEMPTS + 1):
        try:
            if policy is not None:
                policy.url(url)
            # the receiver's answer is never read, only its status: a huge or endless
            # body cannot hold the job (stream, then close)
            response = requests.post(
                url, json=payload, timeout=TIMEOUT_S, allow_redirects=False, stream=True
            )
            response.close()
        except KappaMaskError as err:
            LOGGER.warning("callback to %s not sent: %s", url, err)
            return False
        except requests.RequestException as err:
            reason = f"{type(err).__name__}: {err}"
        else:
            if 200 <= response.status_code < 300:
                return True
            reason = f"HTTP {response.status_code}"
            if response.status_code < 500:  # a refusal or a redirect: asking again won't help
                LOGGER.warning("callback to %s refused: %s", url, reason)
                return False
        if attempt < ATTEMPTS:
            time.sleep(pause)
            pause *= 2
    LOGGER.warning("callback to %s dropped after %d attempts: %s", url, ATTEMPTS, reason)
    return False
