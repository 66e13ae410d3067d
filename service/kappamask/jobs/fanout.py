"""A batch on the job queue: every product is its own child job, run by any worker.

The worker that takes a ``kappamask-batch`` job does not mask anything: it records one
``kappamask`` job per product in the job manager (ids derived from the batch's, so a
batch taken again finds its children instead of making new ones) and queues them; the
batch stays ``running``. Each worker that finishes a child then *advances* its batch under
a Redis lock: it links the child's item into the collection (``collection.json`` written
again, staged and moved in whole), writes the batch's progress over products and, when no
child is left, finishes the batch through the manager's own path (results, callbacks).

The plan (children, product names, the batch's task) is kept in Redis, next to the
queue, because pygeoapi's job records have no room for it. A child that fails is listed
with its error and the batch goes on; dismissing the batch dismisses its children (a
worker drops a queued child, a running one stops between strips).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any

from pygeoapi.util import JobStatus

from kappamask.errors import InternalError
from kappamask.jobs import queue
from kappamask.jobs.batch import BatchResult, CollectionWriter, ProductOutcome, outcome_of
from kappamask.jobs.callbacks import JobSubscriber, deliver
from kappamask.jobs.failures import message_text
from kappamask.jobs.reporting import find_job, job_status, now
from kappamask.sources import ProductRef, describe_reference
from kappamask.storage.sinks import OutputTarget, service_target

LOGGER = logging.getLogger(__name__)

#: The process every child runs.
CHILD_PROCESS = "kappamask"
#: How long a batch's plan is kept after it was last touched (its children are done by then).
PLAN_TTL_S = 30 * 24 * 3600
#: A worker advancing a batch holds its lock at most this long (reading items, writing
#: the collection); others wait for it up to ``LOCK_WAIT_S``.
LOCK_TIMEOUT_S = 300
LOCK_WAIT_S = 600
_NAMESPACE = uuid.UUID("6f1c1c52-8d6e-4f57-9d3c-6b8a0e0f6a11")


@dataclass
class BatchPlan:
    """What a batch was split into, and the batch's own job (to finish it with)."""

    batch_id: str
    children: list[str]
    names: list[str]
    output: str | None
    collection_id: str
    description: str
    #: the batch's own job, to finish it with
    task: queue.QueuedJob
    #: every child is recorded and queued (before that, a missing child is not a lost one)
    queued: bool = False
    #: the last child has finished: the batch's task runs to finish it
    finishing: bool = False
    finished: bool = False
    #: a STAC API that gets the items too (CollectionWriter.stac_api)
    stac_api: str | None = None
    #: item file name -> the item as linked, in the order linked
    linked: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: item file name -> "" once the STAC API has it, else why not
    published: dict[str, str] = field(default_factory=dict)
    #: child job id -> its outcome (ProductOutcome.to_json), once it has finished
    done: dict[str, dict[str, Any]] = field(default_factory=dict)


@cache
def _redis() -> Any:
    import redis

    url = queue.broker_url()
    if url is None:
        raise InternalError("no job queue: KAPPAMASK_BROKER_URL is not set")
    return redis.Redis.from_url(url)


def _key(batch_id: str) -> str:
    return f"kappamask:batch:{batch_id}"


def child_id(batch_id: str, index: int) -> str:
    """The job id of product ``index`` of batch ``batch_id`` (the same each time)."""
    return str(uuid.uuid5(_NAMESPACE, f"{batch_id}/{index}"))


def load(batch_id: str) -> BatchPlan | None:
    raw = _redis().get(_key(batch_id))
    if raw is None:
        return None
    found = json.loads(raw)
    return BatchPlan(**{**found, "task": queue.QueuedJob(**found["task"])})


def _save(plan: BatchPlan) -> None:
    _redis().set(_key(plan.batch_id), json.dumps(asdict(plan)), ex=PLAN_TTL_S)


def fan_out(
    manager: Any,
    batch_id: str,
    products: Sequence[ProductRef],
    child_inputs: dict[str, Any],
    output: str | None,
    collection_id: str,
    description: str,
    task: queue.QueuedJob,
    stac_api_url: str | None = None,
) -> BatchPlan:
    """Record and queue one child job per product (those not recorded yet: a batch taken
    again after its worker died queues only what it had not); the plan."""
    plan = load(batch_id)
    if plan is None:
        # the batch's own task, to finish it with, without the inProgress callback: that
        # one is sent now, as the batch starts
        urls = task.subscriber_urls
        finish_task = replace(task, subscriber_urls=[urls[0], None, urls[2]] if urls else None)
        plan = BatchPlan(
            batch_id,
            [child_id(batch_id, i) for i in range(len(products))],
            [describe_reference(p) for p in products],
            output,
            collection_id,
            description,
            finish_task,
            stac_api=stac_api_url,
        )
        _save(plan)  # before any child exists: a second run finds the same children
        if urls and urls[1]:
            policy = service_target().policy
            subscriber = JobSubscriber(*urls, batch_id, task.process_id, policy)
            deliver(
                subscriber.in_progress_uri,
                subscriber.status_info(JobStatus.running.value, "job started", 0),
                subscriber.policy,
            )
    total = len(plan.children)
    queued = 0
    for index, (child, product) in enumerate(zip(plan.children, products, strict=True)):
        if find_job(child, manager) is not None:
            continue  # queued by a previous run of this batch
        stamp = now()
        manager.add_job(
            {
                "type": "process",
                "identifier": child,
                "process_id": CHILD_PROCESS,
                "created": stamp,
                "started": stamp,
                "updated": stamp,
                "finished": None,
                "status": JobStatus.accepted.value,
                "location": None,
                "mimetype": "application/octet-stream",
                "progress": 0,
                "message": f"product {index + 1}/{total} of batch {batch_id}: queued",
            }
        )
        child_job = queue.QueuedJob(
            CHILD_PROCESS,
            child,
            {**child_inputs, "product": product},
            None,
            None,
            "raw",
            parent=batch_id,
        )
        queue.enqueue(child_job)
        queued += 1
    if queued:
        message = f"{total} products queued as child jobs"
        manager.update_job(
            batch_id,
            {
                "status": JobStatus.running.value,
                "updated": now(),
                "progress": 1,
                "message": message,
            },
        )
        LOGGER.info("batch %s: %d of its %d child jobs queued", batch_id, queued, total)
    if str(manager.get_job(batch_id).get("status")) == JobStatus.dismissed.value:
        dismiss_children(manager, batch_id)  # dismissed while its children were queued
    # children that finished while others were still being queued did not advance it
    advance(manager, batch_id, queued=True)
    return plan


def _outcome(manager: Any, child: str, name: str) -> ProductOutcome | None:
    """A child's outcome, None while it has not finished."""
    job = find_job(child, manager)
    if job is None:  # deleted with its records
        return ProductOutcome(name, "failed", message="the child job was deleted", job=child)
    status = str(job.get("status"))
    if status == JobStatus.successful.value:
        _mimetype, result = manager.get_job_result(child)
        outcome = outcome_of(name, result if isinstance(result, dict) else json.loads(result))
    elif status in (JobStatus.failed.value, JobStatus.dismissed.value):
        outcome = ProductOutcome(
            name, "failed", message=message_text(str(job.get("message") or status))
        )
    else:
        return None
    outcome.job = child
    return outcome


def _writer(plan: BatchPlan, service: OutputTarget) -> CollectionWriter:
    return CollectionWriter(
        service.at(plan.output),
        plan.collection_id,
        plan.description,
        plan.linked,
        plan.stac_api,
        plan.published,
    )


def collect(
    manager: Any, plan: BatchPlan, service: OutputTarget, children: Sequence[str] | None = None
) -> BatchResult:
    """Look at ``children`` (default: every child not known to have finished), link the
    items of those that have succeeded into the collection (one write of it) and remember
    their outcomes in the plan; the batch's result so far, in the order of its products.
    One look per finished child: a batch of 500 products is not 500 x 500 reads of the
    job manager."""
    names = dict(zip(plan.children, plan.names, strict=True))
    looked = [c for c in (plan.children if children is None else children) if c not in plan.done]
    new = [found for child in looked if (found := _outcome(manager, child, names[child]))]
    for outcome in new:
        plan.done[str(outcome.job)] = outcome.to_json()
    writer = _writer(plan, service)
    result = BatchResult(collection="", collection_id=plan.collection_id)
    result.collection = writer.publish(
        *(str(outcome.product_id) for outcome in new if outcome.status == "successful")
    )
    result.products = [ProductOutcome(**plan.done[c]) for c in plan.children if c in plan.done]
    plan.linked, plan.published = writer.linked, writer.published
    result.stac_api = writer.api_report()
    return result


def advance(manager: Any, batch_id: str, child: str | None = None, queued: bool = False) -> None:
    """``child`` of ``batch_id`` has finished (or, with ``queued``, the last child has been
    queued: every child is looked at): link its item, report the batch's progress and
    finish the batch when no child is left (see the module docstring)."""
    lock = _redis().lock(
        f"{_key(batch_id)}:lock", timeout=LOCK_TIMEOUT_S, blocking_timeout=LOCK_WAIT_S
    )
    with lock:
        plan = load(batch_id)
        if plan is None or plan.finished:
            return
        plan.queued = plan.queued or queued  # saved with what follows
        if not plan.queued:
            return  # the worker queueing the children advances it once they all are
        status = job_status(batch_id, manager)
        if status is None or status in queue.FINISHED:
            return
        looked = None if queued or child is None else [child]
        result = collect(manager, plan, service_target(), looked)
        _save(plan)
        finished = len(result.products)
        total = len(plan.children)
        if finished < total:
            manager.update_job(
                batch_id,
                {
                    "status": JobStatus.running.value,
                    "updated": now(),
                    "progress": 1 + 98 * finished // total,
                    "message": f"{finished}/{total} products finished, "
                    f"{finished - result.succeeded} failed",
                },
            )
            return
        LOGGER.info("batch %s: every product finished, finishing the batch", batch_id)
        plan.finishing = True
        _save(plan)
        queue.run_job(*plan.task.args())  # the batch's execute returns its result now
        plan.finished = True
        _save(plan)


def finish(batch_id: str, service: OutputTarget) -> BatchResult:
    """The result of a batch whose children have all finished (its execute, on the
    worker that advanced it last)."""
    plan = load(batch_id)
    if plan is None:
        raise InternalError(f"batch {batch_id} has no plan on the queue")
    if len(plan.done) < len(plan.children):
        raise InternalError(f"batch {batch_id} finished with products left")
    writer = _writer(plan, service)
    result = BatchResult(
        collection=writer.publish(),
        collection_id=plan.collection_id,
        products=[ProductOutcome(**plan.done[c]) for c in plan.children],
        stac_api=writer.api_report(),
    )
    return result


def dismiss_children(manager: Any, batch_id: str) -> int:
    """Dismiss the children of a dismissed batch that have not finished; how many."""
    plan = load(batch_id)
    if plan is None:
        return 0
    dismissed = 0
    for child in plan.children:
        status = job_status(child, manager)  # None: not queued yet, or removed
        if status is not None and status not in queue.FINISHED and manager.delete_job(child):
            dismissed += 1
    LOGGER.info("batch %s dismissed: %d child job(s) dismissed", batch_id, dismissed)
    return dismissed
