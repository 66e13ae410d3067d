"""A STAC API search (pystac-client) into the products of a batch.

``search`` is what a user would give ``pystac_client.Client.search``: the API's ``url``
and ``collections``, ``bbox`` or ``intersects``, ``datetime``, ``query`` (e.g.
``{"eo:cloud_cover": {"lt": 20}}``), ``filter`` (CQL2-JSON) and ``max_items``. It is run
once, when the batch is submitted: a STAC API that is down, a search that matches
nothing, more than ``max_items`` or items that are not Sentinel-2 are refused then, and
the batch holds the items it found (a catalog that changes later does not change it).
Every request, the pages after the first too, passes the server's URL policy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kappamask.access import AccessPolicy
from kappamask.errors import InvalidInputError, KappaMaskError, ProductError, StorageError
from kappamask.sources.stac import is_sentinel2

LOGGER = logging.getLogger(__name__)

#: The keys of a ``search`` object, as pystac-client names them.
SEARCH_KEYS = (
    "url",
    "collections",
    "bbox",
    "intersects",
    "datetime",
    "query",
    "filter",
    "max_items",
)
#: Items a search may find when ``max_items`` is not given.
DEFAULT_MAX_ITEMS = 100
#: Seconds one request to the STAC API may take.
TIMEOUT_S = 30
#: Items per page asked of the API.
PAGE_SIZE = 100


def check_search(search: Any, limit: int) -> tuple[str, dict[str, Any], int]:
    """(API URL, pystac-client search arguments, max items) of a ``search`` object."""
    if not isinstance(search, Mapping):
        raise InvalidInputError("input 'search' must be an object with at least 'url'")
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        raise InvalidInputError(
            f"search: unknown key(s) {', '.join(unknown)}; known: {', '.join(SEARCH_KEYS)}"
        )
    url = search.get("url")
    if not isinstance(url, str) or not url.strip():
        raise InvalidInputError("search: 'url' (the STAC API's landing page) is required")
    if "bbox" in search and "intersects" in search:
        raise InvalidInputError("search: give 'bbox' or 'intersects', not both")
    max_items = search.get("max_items", min(DEFAULT_MAX_ITEMS, limit))
    if not isinstance(max_items, int) or isinstance(max_items, bool) or not 1 <= max_items <= limit:
        raise InvalidInputError(f"search: 'max_items' must be an integer from 1 to {limit}")
    collections = search.get("collections")
    if isinstance(collections, str):
        collections = [collections]
    if collections is not None and not (
        isinstance(collections, list) and all(isinstance(c, str) and c for c in collections)
    ):
        raise InvalidInputError("search: 'collections' must be a collection id or a list of them")
    passed = ("bbox", "intersects", "datetime", "query", "filter")
    arguments: dict[str, Any] = {k: search[k] for k in passed if k in search}
    if collections:
        arguments["collections"] = collections
    return url.strip(), arguments, max_items


def search_items(search: Any, policy: AccessPolicy, limit: int) -> list[dict[str, Any]]:
    """The Sentinel-2 items a STAC API search finds (1 to ``max_items`` of them)."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    url, arguments, max_items = check_search(search, limit)
    policy.url(url)

    def checked(request: Any) -> Any:  # every page: the same policy as the first
        policy.url(str(request.url))
        return request

    try:
        # two tries: an API that is down is an answer within seconds, not minutes
        stac_io = StacApiIO(request_modifier=checked, timeout=TIMEOUT_S, max_retries=1)
        client = Client.open(url, stac_io=stac_io)
        found = client.search(**arguments, max_items=max_items + 1, limit=PAGE_SIZE)
        items = [item.to_dict(transform_hrefs=False) for item in found.items()]
    except KappaMaskError:
        raise
    except APIError as err:
        status = getattr(err, "status_code", None)
        if status is None:  # no answer at all
            raise StorageError(f"the STAC API at {url} cannot be reached: {err}") from err
        if 400 <= status < 500:
            raise InvalidInputError(f"the STAC API at {url} refused the search: {err}") from err
        raise StorageError(f"the STAC API at {url} failed ({status}): {err}") from err
    except (OSError, ValueError) as err:  # requests' errors are OSErrors; JSON is a ValueError
        raise StorageError(f"the STAC API at {url} cannot be searched: {err}") from err
    if not items:
        raise InvalidInputError(f"the search of {url} matched no items: {arguments}")
    if len(items) > max_items:
        raise InvalidInputError(
            f"the search of {url} matched more than {max_items} items (max_items): narrow "
            f"it (bbox, datetime, query) or raise max_items up to {limit}"
        )
    others = [str(item.get("id")) for item in items if not is_sentinel2(item.get("properties", {}))]
    if others:
        raise ProductError(
            f"the search of {url} matched {len(others)} item(s) that are not Sentinel-2 "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): name the "
            "Sentinel-2 collection(s) in 'collections'"
        )
    LOGGER.info("search of %s: %d Sentinel-2 items", url, len(items))
    return items
