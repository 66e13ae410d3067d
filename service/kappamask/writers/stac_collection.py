"""The STAC Collection of a batch: ``create_collection``, a pure function of the items of
its finished products (extent, summaries, one ``item`` link each, relative hrefs), and
``link_item``, the links an item gains when it joins the collection.

The collection sits next to its items (``collection.json`` in the batch's output folder or
S3 prefix) and links them as ``./<item file>``, so the folder can be copied, served or
synced as it is and pystac, pystac-client and QGIS open it from wherever it lands.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pystac

from kappamask import __version__

COLLECTION_FILE = "collection.json"
#: The collection's id when a batch names none.
DEFAULT_COLLECTION_ID = "kappamask"
COLLECTION_LINK_RELS = ("collection", "parent", "root")
#: Sentinel-2 data and products derived from them come under the Copernicus licence.
LICENSE_LINK = {
    "rel": "license",
    "href": "https://sentinels.copernicus.eu/documents/247904/690755/Sentinel_Data_Legal_Notice",
    "type": "application/pdf",
    "title": "Legal notice on the use of Copernicus Sentinel Data and Service Information",
}


def link_item(item: Mapping[str, Any], collection_id: str) -> dict[str, Any]:
    """A copy of ``item`` in collection ``collection_id`` (its ``collection`` field and
    ``collection`` / ``parent`` / ``root`` links to ``./collection.json``)."""
    linked = copy.deepcopy(dict(item))
    linked["collection"] = collection_id
    links = [
        link for link in linked.get("links", []) if link.get("rel") not in COLLECTION_LINK_RELS
    ]
    for rel in COLLECTION_LINK_RELS:
        links.append({"rel": rel, "href": f"./{COLLECTION_FILE}", "type": "application/json"})
    linked["links"] = links
    return linked


def _range(values: Sequence[float]) -> dict[str, float]:
    return {"minimum": min(values), "maximum": max(values)}


def create_collection(
    collection_id: str,
    description: str,
    items: Sequence[Mapping[str, Any]],
    item_hrefs: Sequence[str],
) -> dict[str, Any]:
    """The collection over ``items`` (STAC item dicts) found at ``item_hrefs`` (relative to
    the collection). A batch without a finished product yet has an empty extent: the
    whole globe and an open interval, as STAC asks of an empty collection."""
    if len(items) != len(item_hrefs):
        raise ValueError("one href per item")
    bboxes = [item["bbox"] for item in items if item.get("bbox")]
    if bboxes:
        bbox = [
            min(b[0] for b in bboxes),
            min(b[1] for b in bboxes),
            max(b[2] for b in bboxes),
            max(b[3] for b in bboxes),
        ]
    else:
        bbox = [-180.0, -90.0, 180.0, 90.0]
    times = sorted(str(item["properties"]["datetime"]) for item in items)
    interval = [times[0], times[-1]] if times else [None, None]
    props = [item["properties"] for item in items]
    summaries: dict[str, Any] = {}
    for key in (
        "platform",
        "constellation",
        "instruments",
        "proj:code",
        "kappamask:source_level",
        "kappamask:processing_baseline",
    ):
        values: list[Any] = []
        for p in props:
            value = p.get(key)
            for v in value if isinstance(value, list) else [value]:
                if v is not None and v not in values:
                    values.append(v)
        if values:
            summaries[key] = values
    for key in ("eo:cloud_cover", "kappamask:missing_percentage"):
        numbers = [float(p[key]) for p in props if isinstance(p.get(key), (int, float))]
        if numbers:
            summaries[key] = _range(numbers)
    models = sorted(
        {
            f"{m.get('name')} {m.get('version')}"
            for p in props
            if isinstance(m := p.get("kappamask:model"), dict)
        }
    )
    if models:
        summaries["kappamask:model"] = models
    links: list[dict[str, Any]] = [
        {"rel": "root", "href": f"./{COLLECTION_FILE}", "type": "application/json"},
        LICENSE_LINK,
    ]
    for item, href in zip(items, item_hrefs, strict=True):
        links.append(
            {
                "rel": "item",
                "href": href,
                "type": "application/geo+json",
                "title": str(item.get("id", "")),
            }
        )
    collection = {
        "type": "Collection",
        "stac_version": pystac.get_stac_version(),
        "stac_extensions": [],
        "id": collection_id,
        "title": f"KappaMask cloud masks: {collection_id}",
        "description": description,
        "keywords": ["Sentinel-2", "cloud mask", "cloud shadow", "KappaMask"],
        "license": "other",
        "providers": [{"name": f"KappaMask service {__version__}", "roles": ["processor"]}],
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}},
        "summaries": summaries,
        "links": links,
    }
    return collection
