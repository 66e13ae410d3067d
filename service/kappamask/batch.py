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

from kappamask.access import AccessPolicy
from kappamask.errors import CancelledError, InvalidInputError, KappaMaskError
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import ProgressFn, output_names, run
from kappamask.sources import ProductRef, describe_reference
from kappamask.storage import open_sink
from kappamask.writers.stac_collection import COLLECTION_FILE, create_collection, link_item

LOGGER = logging.getLogger(__name__)

#: Products one batch may hold: a season of one tile is about 150 (a product every 2-3
#: days from two satellites, both orbits); larger areas are several batches.
MAX_PRODUCTS = 500
#: Collection ids: what STAC APIs accept as a path segment.
COLLECTION_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
DEFAULT_COLLECTION_ID = "kappamask"


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

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class BatchResult:
    """The collection and every product's outcome, in the order given."""

    collection: str
    collection_id: str
    products: list[ProductOutcome] = field(default_factory=list)

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
        }


def check_batch(products: Sequence[ProductRef], collection_id: str) -> None:
    """Refuse an empty or oversized batch and a collection id a STAC API would refuse."""
    if not products:
        raise InvalidInputError("a batch needs at least one product")
    if len(products) > MAX_PRODUCTS:
        raise InvalidInputError(
            f"a batch holds at most {MAX_PRODUCTS} products, not {len(products)}: split it"
        )
    if not collection_id or not set(collection_id) <= COLLECTION_ID_CHARS:
        raise InvalidInputError(
            "collection id must be letters, digits, '-', '_' or '.', not " + repr(collection_id)
        )


def run_batch(
    products: Sequence[ProductRef],
    output: str | Path,
    client: TritonClient,
    options: RunOptions | None = None,
    policy: AccessPolicy | None = None,
    collection_id: str = DEFAULT_COLLECTION_ID,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    output_base: Path | None = None,
    public_url: str | None = None,
) -> BatchResult:
    """Mask every product of ``products`` into ``output`` and publish their collection.

    Progress runs over the products (the current product's own progress inside its
    share); a cancellation between or inside products raises CancelledError after the
    collection lists the products finished so far."""
    check_batch(products, collection_id)
    options = options or RunOptions()
    policy = policy or AccessPolicy.unrestricted()
    report = progress or (lambda _p, _m: None)
    is_cancelled = cancelled or (lambda: False)
    total = len(products)
    result = BatchResult(collection="", collection_id=collection_id)
    linked: dict[str, dict[str, Any]] = {}  # item file name -> item as linked, in order
    description = (
        f"Cloud masks of {total} Sentinel-2 product(s) by KappaMask "
        f"(Domnich et al. 2021) at {options.resolution} m"
    )
    result.collection = _publish(output, policy, output_base, public_url, collection_id,
                                 description, linked, None)  # fmt: skip
    for index, ref in enumerate(products):
        name = describe_reference(ref)
        if is_cancelled():
            raise CancelledError(f"batch cancelled after {index} of {total} products")

        def product_progress(percent: int, message: str, index: int = index,
                             name: str = name) -> None:  # fmt: skip
            report((100 * index + percent) // total,
                   f"product {index + 1}/{total} ({name}): {message}")  # fmt: skip

        try:
            run_result = run(ref, output, client, options, product_progress, is_cancelled,
                             policy, output_base, public_url)  # fmt: skip
        except CancelledError:
            raise
        except KappaMaskError as err:
            LOGGER.warning("batch product %s failed: %s", name, err)
            result.products.append(ProductOutcome(name, "failed", message=str(err)))
            continue
        item_name = output_names(run_result.product_id)["item"]
        result.products.append(ProductOutcome(
            name, "successful", product_id=run_result.product_id, item=run_result.item,
            reused=run_result.reused, cloud_cover=run_result.statistics.get("cloud_cover"),
        ))  # fmt: skip
        if item_name not in linked:
            linked[item_name] = {}  # read back and linked by _publish
            result.collection = _publish(output, policy, output_base, public_url, collection_id,
                                         description, linked, item_name)  # fmt: skip
    report(100, f"{result.succeeded}/{total} products masked")
    return result


def _publish(
    output: str | Path,
    policy: AccessPolicy,
    output_base: Path | None,
    public_url: str | None,
    collection_id: str,
    description: str,
    linked: dict[str, dict[str, Any]],
    new_item: str | None,
) -> str:
    """Link ``new_item`` (published by its run) into the collection and write the
    collection over every item of ``linked``; the collection's href."""
    with open_sink(output, policy, output_base, public_url) as sink:
        names = []
        if new_item is not None:
            raw = sink.read_existing(new_item)
            if raw is None:
                raise KappaMaskError(f"the item {new_item} of a finished product is missing")
            linked[new_item] = link_item(json.loads(raw), collection_id)
            sink.path(new_item).write_text(json.dumps(linked[new_item], indent=2))
            names.append(new_item)
        collection = create_collection(collection_id, description, list(linked.values()),
                                       [f"./{name}" for name in linked])  # fmt: skip
        sink.path(COLLECTION_FILE).write_text(json.dumps(collection, indent=2))
        names.append(COLLECTION_FILE)
        return sink.commit(names)[-1]
