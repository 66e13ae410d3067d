"""The pygeoapi processes ``kappamask`` and ``kappamask-batch``: thin shells over
``pipeline.run`` and ``batch.run_batch``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pygeoapi.process.base import BaseProcessor

from kappamask import __version__, settings
from kappamask.access import AccessPolicy
from kappamask.errors import (
    InferenceUnavailableError,
    InternalError,
    InvalidInputError,
    KappaMaskError,
)
from kappamask.inference.triton import TritonClient
from kappamask.jobs import fanout, queue
from kappamask.jobs.batch import (
    MAX_PRODUCTS,
    check_batch,
    describe,
    resolve_search,
    run_batch,
)
from kappamask.jobs.failures import record_failure, to_process_error
from kappamask.jobs.reporting import JobReporter, inference_slot
from kappamask.options import RunOptions, input_schema, text_input
from kappamask.pipeline import PROGRESS_START, run
from kappamask.sources import ProductRef, describe_reference, open_product
from kappamask.sources.search import DEFAULT_MAX_ITEMS, SEARCH_KEYS
from kappamask.storage.sinks import OutputTarget, service_target
from kappamask.writers.stac_api import check_api
from kappamask.writers.stac_collection import DEFAULT_COLLECTION_ID

LOGGER = logging.getLogger(__name__)


PROCESS_METADATA: dict[str, Any] = {
    "version": __version__,
    "id": "kappamask",
    "title": {"en": "KappaMask: Sentinel-2 cloud and cloud shadow mask"},
    "description": {
        "en": "Classifies every pixel of a Sentinel-2 L1C or L2A product as clear, cloud "
        "shadow, semi-transparent cloud, cloud or missing with the KappaMask U-Nets "
        "(Domnich et al. 2021) and returns a Cloud-Optimized GeoTIFF, a confidence COG, "
        "a cloud probability COG, a usable-pixel mask COG, a PNG preview and a STAC item; "
        "clouds and shadows optionally grown by buffers."
    },
    "jobControlOptions": ["sync-execute", "async-execute"],
    "outputTransmission": ["value"],
    "keywords": ["Sentinel-2", "cloud mask", "cloud shadow", "KappaMask", "U-Net"],
    "links": [
        {
            "type": "text/html",
            "rel": "about",
            "title": "KappaMask: AI-Based Cloudmask Processor for Sentinel-2 "
            "(Remote Sensing 13:4100)",
            "href": "https://doi.org/10.3390/rs13204100",
            "hreflang": "en-US",
        }
    ],
    "inputs": {
        "product": {
            "title": "Sentinel-2 product",
            "description": "A Sentinel-2 L1C or L2A product: a .SAFE folder or .zip inside the "
            "server's data roots, an s3://bucket/.../NAME.SAFE (or .zip), a STAC item URL "
            "(http(s) or s3://...json), or a STAC item object.",
            "schema": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "object", "required": ["type", "assets"]},
                ]
            },
            "minOccurs": 1,
            "maxOccurs": 1,
            "keywords": ["SAFE", "S3", "STAC"],
        },
        "output": {
            "title": "Output location",
            "description": "A folder (relative to the server's output folder, or inside its "
            "output roots) or s3://bucket/prefix. Default: the server's output folder.",
            "schema": {"type": "string", "minLength": 1},
            "minOccurs": 0,
            "maxOccurs": 1,
        },
        **input_schema(),
    },
    "outputs": {
        "result": {
            "title": "Result",
            "description": "Hrefs (URLs where the service serves its output folder) of the "
            "mask, confidence, cloud probability and usable-pixel COGs, the preview PNG and "
            "the STAC item, with the class percentages and cloud cover over the pixels with "
            "data inside the bbox/aoi (the whole tile without one).",
            "schema": {"type": "object", "contentMediaType": "application/json"},
        }
    },
    "example": {
        "inputs": {
            "product": "tests/data/s2/"
            "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE",
            "resolution": 60,
        }
    },
}


def _batch_metadata() -> dict[str, Any]:
    """``kappamask-batch``: the inputs of ``kappamask`` with ``products`` (a list) in place
    of ``product``, and the collection's id."""
    meta = copy.deepcopy(PROCESS_METADATA)
    single = meta["inputs"].pop("product")
    meta.update(
        {
            "id": "kappamask-batch",
            "title": {"en": "KappaMask batch: cloud masks of many Sentinel-2 products"},
            "description": {
                "en": "Masks every product of a list, or every Sentinel-2 item a STAC "
                "API search finds, as the kappamask process does, into one output, "
                "and publishes a STAC Collection (collection.json) over the results, "
                "optionally to a STAC API as well. On a job queue each product is its "
                "own kappamask job on any worker. A product that fails is listed with "
                "its error; the others go on. Dismissing the batch stops its products; "
                "the collection keeps those finished by then."
            },
            "jobControlOptions": ["async-execute", "sync-execute"],
        }
    )
    meta["inputs"] = {
        "products": {
            "title": "Sentinel-2 products",
            "description": f"1 to {MAX_PRODUCTS} products, each anything the kappamask "
            "process takes as 'product'.",
            "schema": {
                "type": "array",
                "items": single["schema"],
                "minItems": 1,
                "maxItems": MAX_PRODUCTS,
            },
            "minOccurs": 0,
            "maxOccurs": 1,
        },
        "search": {
            "title": "STAC API search",
            "description": "Instead of 'products': the Sentinel-2 items a STAC API search "
            "finds, run when the batch is submitted (pystac-client): url (the API), "
            'collections, bbox or intersects, datetime, query (e.g. {"eo:cloud_cover": '
            f'{{"lt": 20}}}}), filter (CQL2-JSON), max_items (default {DEFAULT_MAX_ITEMS}, '
            f"at most {MAX_PRODUCTS}; a search that finds more is refused).",
            "schema": {
                "type": "object",
                "required": ["url"],
                "properties": {key: {} for key in SEARCH_KEYS},
            },
            "minOccurs": 0,
            "maxOccurs": 1,
        },
        "stac_api": {
            "title": "Publish to a STAC API",
            "description": "The root URL of a STAC API with the Transactions extension: the "
            "collection and each product's item are created (or replaced) there too.",
            "schema": {"type": "string", "format": "uri"},
            "minOccurs": 0,
            "maxOccurs": 1,
        },
        "collection_id": {
            "title": "Collection id",
            "description": "Id of the STAC Collection over the results (letters, digits, "
            "'-', '_', '.').",
            "schema": {"type": "string", "default": DEFAULT_COLLECTION_ID},
            "minOccurs": 0,
            "maxOccurs": 1,
        },
        **meta["inputs"],
    }
    meta["outputs"] = {
        "result": {
            "title": "Result",
            "description": "The collection's href and, per product in the order given, its "
            "outcome: the STAC item's href and cloud cover, or the error message (and its "
            "own job on a queue); with stac_api, what the API holds.",
            "schema": {"type": "object", "contentMediaType": "application/json"},
        }
    }
    meta["example"] = {
        "inputs": {
            "products": [PROCESS_METADATA["example"]["inputs"]["product"]],
            "resolution": 60,
            "collection_id": "example",
        }
    }
    return meta


BATCH_METADATA = _batch_metadata()


@dataclass(frozen=True)
class ProcessSettings:
    """What the processes take from the service's settings (``kappamask.settings``)."""

    #: None: no Triton configured (jobs fail with 503 saying so).
    triton_url: str | None
    triton_protocol: str
    #: Inference pipelines one API process runs at once; further jobs wait (accepted).
    max_jobs: int
    #: The service's output folder, its access policy and the URL it is served at.
    service: OutputTarget

    @classmethod
    def from_settings(cls, config: settings.Settings) -> ProcessSettings:
        return cls(
            triton_url=config.triton_url,
            triton_protocol=config.triton_protocol,
            max_jobs=max(1, config.max_concurrent_jobs),
            service=service_target(config),
        )

    @property
    def policy(self) -> AccessPolicy:
        return self.service.policy

    def target(self, output: str | None) -> OutputTarget:
        """Where a job's results go: ``output`` (relative to the output folder), or the
        output folder itself."""
        return self.service.at(output)


def _check_names(data: Any, metadata: dict[str, Any]) -> None:
    """Inputs are a JSON object of the process's input names only."""
    if not isinstance(data, dict):
        raise InvalidInputError("inputs must be a JSON object")
    unknown = sorted(set(data) - set(metadata["inputs"]))
    if unknown:
        raise InvalidInputError(f"unknown input(s): {', '.join(unknown)}")


def parse_inputs(data: Any) -> tuple[ProductRef, str | None, RunOptions]:
    """Validate the execute request's inputs: (product, output, options).

    Unknown names and wrong types are errors naming the input (RunOptions checks the
    options, as it does for the CLI).
    """
    _check_names(data, PROCESS_METADATA)
    product = data.get("product")
    required = "a path, an s3:// or STAC item URL, or a STAC item"
    if product is None:
        raise InvalidInputError(f"input 'product' is required: {required}")
    if not isinstance(product, dict):
        product = text_input(data, "product", required) or ""
    output = text_input(data, "output", "a folder or s3://bucket/prefix")
    return product, output, RunOptions.from_inputs(data)


class KappaMaskProcessor(BaseProcessor):
    """pygeoapi processor; construction does no I/O (pygeoapi builds one per request)."""

    #: The process description (inputs, outputs, job control) of this processor.
    METADATA: dict[str, Any] = PROCESS_METADATA

    def __init__(self, processor_def: dict[str, Any]) -> None:
        super().__init__(processor_def, self.METADATA)
        self.settings = ProcessSettings.from_settings(settings.current())
        self.job_id: str | None = None
        #: The product of this processor's job, once opened (its finished job names it).
        self.subject: str | None = None

    def set_job_id(self, job_id: str) -> None:
        super().set_job_id(job_id)
        self.job_id = job_id

    def execute(
        self, data: dict[str, Any], outputs: dict[str, Any] | None = None
    ) -> tuple[str, Any]:
        job = JobReporter(self.job_id)
        try:
            result = self._run(data, job)
        except KappaMaskError as err:
            LOGGER.warning("job %s failed: %s", self.job_id, err)
            record_failure(self.job_id, err)
            raise to_process_error(err) from err
        except Exception as err:  # a bug here, never the client's fault
            LOGGER.exception("job %s failed on an internal error", self.job_id)
            internal = InternalError(
                f"internal error of the {self.metadata['id']} process: {type(err).__name__}: {err}"
            )
            record_failure(self.job_id, internal)
            raise to_process_error(internal) from err
        return "application/json", result

    def _run(self, data: dict[str, Any], job: JobReporter) -> dict[str, Any]:
        reference, output, options = parse_inputs(data)
        # opened before an inference slot is taken: a product that cannot be read (a
        # server that stalls, a refused file) never holds one
        product = open_product(reference, self.settings.policy)
        job.subject = self.subject = describe_reference(product)
        with self._client(job, PROGRESS_START, "inference") as client:
            result = run(
                product,
                self.settings.target(output),
                client,
                options,
                progress=job.update,
                cancelled=job.cancelled,
            )
        return result.to_json()

    @contextmanager
    def _client(self, job: JobReporter, percent: int, what: str) -> Iterator[TritonClient]:
        """One of this API process's inference slots (the job stays accepted while it
        waits), then a Triton client for the job."""
        with inference_slot(self.settings.max_jobs, job):
            job.update(percent, f"running: {what}")
            if self.settings.triton_url is None:
                raise InferenceUnavailableError(
                    "this service has no Triton: KAPPAMASK_TRITON_URL is not set"
                )
            with TritonClient(self.settings.triton_url, self.settings.triton_protocol) as client:
                yield client

    def __repr__(self) -> str:
        return f"<KappaMaskProcessor> {self.name}"


@dataclass(frozen=True)
class BatchInputs:
    """A batch's validated inputs."""

    products: list[ProductRef]
    output: str | None
    options: RunOptions
    collection_id: str
    stac_api: str | None


def parse_batch_inputs(data: Any) -> BatchInputs:
    """Validate a batch's inputs (a ``search`` is resolved into ``products`` before, by
    ``prepare_batch``)."""
    _check_names(data, BATCH_METADATA)
    if "search" in data:
        raise InvalidInputError("input 'search' was not resolved into products")
    listed = data.get("products")
    if not isinstance(listed, list):
        raise InvalidInputError(
            "input 'products' or 'search' is required: a list of products or a STAC API search"
        )
    products: list[ProductRef] = []
    for index, product in enumerate(listed):
        if isinstance(product, dict):
            products.append(product)
        else:
            what = "a path, an s3:// or STAC item URL, or a STAC item"
            products.append(text_input({"products": product}, "products", what) or "")
            if not products[-1]:
                raise InvalidInputError(f"products[{index}] must be {what}")
    collection_id = text_input(data, "collection_id", "a collection id")
    collection_id = collection_id or DEFAULT_COLLECTION_ID
    check_batch(products, collection_id)
    output = text_input(data, "output", "a folder or s3://bucket/prefix")
    stac_api = text_input(data, "stac_api", "the URL of a STAC API")
    return BatchInputs(products, output, RunOptions.from_inputs(data), collection_id, stac_api)


def prepare_batch(data: dict[str, Any], policy: AccessPolicy) -> BatchInputs:
    """What a batch needs checked before it is accepted (the API, the CLI): its search run
    into ``products`` (in place: the job holds the items found), its STAC API asked for
    Transactions, every input validated."""
    _check_names(data, BATCH_METADATA)
    if "search" in data:
        data["products"] = resolve_search(data.get("products"), data.pop("search"), policy)
    if data.get("stac_api") is not None:
        url = text_input(data, "stac_api", "the URL of a STAC API") or ""
        data["stac_api"] = check_api(url, policy)
    return parse_batch_inputs(data)


def child_inputs(data: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a batch that each of its products' ``kappamask`` jobs takes."""
    return {k: v for k, v in data.items() if k in PROCESS_METADATA["inputs"] and k != "product"}


class KappaMaskBatchProcessor(KappaMaskProcessor):
    """pygeoapi processor of ``kappamask-batch``. In one process (no job queue): one
    inference slot for the whole batch, products one after another. On the job queue:
    each product a child job on any worker (``fan_out``, ``kappamask.jobs.fanout``)."""

    METADATA = BATCH_METADATA

    def prepare(self, data: dict[str, Any]) -> None:
        """At submission (the API process): ``prepare_batch``."""
        prepare_batch(data, self.settings.policy)

    def fan_out(self, manager: Any, job: queue.QueuedJob) -> bool:
        """Queue the batch's products as child jobs (a worker's side; registered with the
        queue by ``register_batch``); whether the batch's ``execute`` should run now: when
        its last child has finished, or to fail on inputs it refuses."""
        job_id, data = job.job_id, job.data
        plan = fanout.load(job_id)
        if plan is not None and plan.finishing:
            return True
        try:
            batch = parse_batch_inputs(data)
        except KappaMaskError:
            return True  # execute raises it again and the job fails by its cause
        fanout.fan_out(
            manager,
            job_id,
            batch.products,
            child_inputs(data),
            batch.output,
            batch.collection_id,
            describe(len(batch.products), batch.options),
            job,
            batch.stac_api,
        )
        return False

    def _run(self, data: dict[str, Any], job: JobReporter) -> dict[str, Any]:
        batch = parse_batch_inputs(data)
        if queue.in_worker() and self.job_id is not None:
            # every child has finished (fan_out): the collection and their outcomes
            return fanout.finish(self.job_id, self.settings.service).to_json()
        with self._client(job, 1, f"{len(batch.products)} products") as client:
            result = run_batch(
                batch.products,
                self.settings.target(batch.output),
                client,
                batch.options,
                batch.collection_id,
                progress=job.update,
                cancelled=job.cancelled,
                stac_api_url=batch.stac_api,
            )
        return result.to_json()

    def __repr__(self) -> str:
        return f"<KappaMaskBatchProcessor> {self.name}"


def register_batch() -> None:
    """Tell the queue how a batch starts on a worker and what advances it (called where
    queued jobs run: ``kappamask worker``)."""
    queue.register_fan_out(KappaMaskBatchProcessor, KappaMaskBatchProcessor.fan_out)
    queue.on_child_finished(fanout.advance)
