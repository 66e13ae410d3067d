"""A batch: many products masked into one output, with a STAC Collection over the results.

Each product goes through the single-product pipeline (``pipeline.run``) into the batch's
output folder or S3 prefix (file names carry the product id, so products never collide
and a product given twice, or a batch run again, finds its result and is not computed
again). A product that fails is listed with its error and the batch goes on; only a
cancellation stops it. After each finished product the collection (``collection.json``
next to the items) is written again with every finished item linked, and the item gains
its collection links, each file staged and then moved in whole: a batch that dies half-way
leaves a valid collection of the products it finished, never a half-written one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kappamask.access import AccessPolicy, safe_name
from kappamask.errors import CancelledError, InvalidInputError, KappaMaskError
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import ProgressFn, run
from kappamask.sources import ProductRef, describe_reference
from kappamask.sources.search import search_items
from kappamask.storage.sinks import OutputTarget, output_names
from kappamask.writers import stac_api
from kappamask.writers.stac_collection import (
    COLLECTION_FILE,
    DEFAULT_COLLECTION_ID,
    create_collection,
    link_item,
)

LOGGER = logging.getLogger(__name__)

#: Products one batch may hold: a season of one tile is about 150 (a product every 2-3
#: days from two satellites, both orbits); larger areas are several batches.
MAX_PRODUCTS = 500


@dataclass
class ProductOutcome:
    """What became of one product of a batch."""

    product: str
    status: str  # "successful" or "failed"
    product_id: str | None = None
    item: str | None = None
    message: str | None = None
    reused: bool = False
    cloud_cover: float | None = None
    #: The product's own job, when the batch ran on the job queue.
    job: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class BatchResult:
    """The collection and every product's outcome, in the order given."""

    collection: str
    collection_id: str
    products: list[ProductOutcome] = field(default_factory=list)
    #: CollectionWriter.api_report: the STAC API's copy, when the batch publishes to one
    stac_api: dict[str, Any] | None = None

    @property
    def succeeded(self) -> int:
        return sum(p.status == "successful" for p in self.products)

    def to_json(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "collection_id": self.collection_id,
            "succeeded": self.succeeded,
            "failed": len(self.products) - self.succeeded,
            "products": [p.to_json() for p in self.products],
            **({"stac_api": self.stac_api} if self.stac_api is not None else {}),
        }


def check_batch(products: Sequence[ProductRef], collection_id: str) -> None:
    """Refuse an empty or oversized batch and a collection id a STAC API would refuse."""
    if not products:
        raise InvalidInputError("a batch needs at least one product")
    if len(products) > MAX_PRODUCTS:
        raise InvalidInputError(
            f"a batch holds at most {MAX_PRODUCTS} products, not {len(products)}: split it"
        )
    # a path segment of the STAC API it may be published to: never '..'
    safe_name(collection_id, "collection id", "a collection id")


def resolve_search(
    products: list[ProductRef] | None, search: Any, policy: AccessPolicy
) -> list[ProductRef]:
    """A batch's products: those listed, or the items ``search`` finds (run now, once)."""
    if search is None:
        return list(products or [])
    if products:
        raise InvalidInputError("give 'products' or 'search', not both")
    return list(search_items(search, policy, MAX_PRODUCTS))


def describe(total: int, options: RunOptions) -> str:
    """The collection's description."""
    return (
        f"Cloud masks of {total} Sentinel-2 product(s) by KappaMask "
        f"(Domnich et al. 2021) at {options.resolution} m"
    )


def outcome_of(name: str, result: dict[str, Any]) -> ProductOutcome:
    """A successful product's outcome from its run's result (``RunResult.to_json``)."""
    cover = result.get("cloud_cover")
    return ProductOutcome(
        name,
        "successful",
        product_id=str(result["product_id"]),
        item=str(result["item"]),
        reused=bool(result.get("reused")),
        cloud_cover=None if cover is None else float(cover),
    )


def run_batch(
    products: Sequence[ProductRef],
    output: OutputTarget | str | Path,
    client: TritonClient,
    options: RunOptions | None = None,
    collection_id: str = DEFAULT_COLLECTION_ID,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    stac_api_url: str | None = None,
) -> BatchResult:
    """Mask every product of ``products`` into ``output``, one after another, and publish
    their collection (one process; on the job queue each product is a child job instead,
    ``kappamask.jobs.fanout``).

    Progress runs over the products (the current product's own progress inside its
    share); a cancellation between or inside products raises CancelledError after the
    collection lists the products finished so far."""
    check_batch(products, collection_id)
    options = options or RunOptions()
    report = progress or (lambda _p, _m: None)
    is_cancelled = cancelled or (lambda: False)
    total = len(products)
    target = OutputTarget.of(output)
    collection = CollectionWriter(
        target, collection_id, describe(total, options), stac_api=stac_api_url
    )
    result = BatchResult(collection=collection.publish(), collection_id=collection_id)
    for index, ref in enumerate(products):
        name = describe_reference(ref)
        if is_cancelled():
            raise CancelledError(f"batch cancelled after {index} of {total} products")

        def product_progress(
            percent: int, message: str, index: int = index, name: str = name
        ) -> None:
            report(
                (100 * index + percent) // total, f"product {index + 1}/{total} ({name}): {message}"
            )

        try:
            run_result = run(ref, target, client, options, product_progress, is_cancelled)
        except CancelledError:
            raise
        except KappaMaskError as err:
            LOGGER.warning("batch product %s failed: %s", name, err)
            result.products.append(ProductOutcome(name, "failed", message=str(err)))
            continue
        outcome = outcome_of(name, run_result.to_json())
        result.products.append(outcome)
        result.collection = collection.publish(run_result.product_id)
    result.stac_api = collection.api_report()
    report(100, f"{result.succeeded}/{total} products masked")
    return result


@dataclass
class CollectionWriter:
    """The batch's ``collection.json`` over the items linked so far (in the order linked),
    written again, staged and moved in whole, each time an item joins."""

    target: OutputTarget
    collection_id: str
    description: str
    #: item file name -> the item as linked (with its collection links)
    linked: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: a STAC API (root URL, Transactions checked) that gets the collection and items too
    stac_api: str | None = None
    #: item file name -> "" once the STAC API has it, else why it has not
    published: dict[str, str] = field(default_factory=dict)

    def publish(self, *product_ids: str) -> str:
        """Link the items of ``product_ids`` (published by their runs; those linked already
        are skipped) and write the collection; the collection's href."""
        with self.target.open() as sink:
            names = []
            for product_id in product_ids:
                new_item = output_names(product_id)["item"]
                if new_item in self.linked:
                    continue
                raw = sink.read_existing(new_item)
                if raw is None:
                    raise KappaMaskError(f"the item {new_item} of a finished product is missing")
                self.linked[new_item] = link_item(json.loads(raw), self.collection_id)
                sink.path(new_item).write_text(json.dumps(self.linked[new_item], indent=2))
                names.append(new_item)
            collection = create_collection(
                self.collection_id,
                self.description,
                list(self.linked.values()),
                [f"./{name}" for name in self.linked],
            )
            sink.path(COLLECTION_FILE).write_text(json.dumps(collection, indent=2))
            names.append(COLLECTION_FILE)
            hrefs = sink.commit({name: name for name in names})
        if self.stac_api is not None:
            self._to_api(collection, hrefs)
        return hrefs[COLLECTION_FILE]

    def _to_api(self, collection: dict[str, Any], hrefs: dict[str, str]) -> None:
        """The collection and the items just linked, to the STAC API; what it refuses is
        remembered per item (``api_report``), never raised."""
        assert self.stac_api is not None
        try:
            stac_api.publish_collection(
                self.stac_api, collection, hrefs[COLLECTION_FILE], self.target.policy
            )
            failed = ""
        except KappaMaskError as err:
            LOGGER.warning("collection %s not published: %s", self.collection_id, err)
            failed = f"the collection could not be published: {err}"
        for name, href in hrefs.items():
            if name == COLLECTION_FILE:
                continue
            self.published[name] = failed
            if not failed:
                try:
                    stac_api.publish_item(
                        self.stac_api, self.linked[name], href, self.target.policy
                    )
                except KappaMaskError as err:
                    LOGGER.warning("item %s not published: %s", name, err)
                    self.published[name] = str(err)

    def api_report(self) -> dict[str, Any] | None:
        """What the STAC API holds of the batch (None without one)."""
        if self.stac_api is None:
            return None
        errors = {name: why for name, why in self.published.items() if why}
        return {
            "url": self.stac_api,
            "collection": f"{self.stac_api}/collections/{self.collection_id}",
            "published": len(self.published) - len(errors),
            "errors": errors,
        }
