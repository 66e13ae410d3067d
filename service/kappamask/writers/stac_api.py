"""A batch's items published to a STAC API through its Transactions extension.

The static collection (``collection.json`` and items with relative links) stays the
record; a catalog such as stac-fastapi-pgstac on a DIAS gets the same collection and
items as well, created or replaced (POST, then PUT on 409), with the static links left
out (the API makes its own) and asset hrefs made absolute. The API is checked when the
batch is submitted (reachable, Transactions in its conformance classes); an item it later
refuses is reported in the batch's result and never fails the product.
``KAPPAMASK_STAC_API_AUTH`` is sent as the Authorization header when set.
"""

from __future__ import annotations

import copy
import os
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from kappamask import settings
from kappamask.access import AccessPolicy
from kappamask.errors import InvalidInputError, StorageError

#: Seconds one request may take.
TIMEOUT_S = 30
#: Conformance classes of the Transactions extension (items; 1.0.0 and its drafts).
TRANSACTIONS = "/ogcapi-features/extensions/transaction"
#: Links of the static catalog that mean nothing inside an API.
STATIC_RELS = {"self", "root", "parent", "collection", "item"}


def _headers() -> dict[str, str]:
    auth = settings.current().stac_api_auth
    return {"Authorization": auth} if auth else {}


def _request(method: str, url: str, policy: AccessPolicy, body: Any = None) -> requests.Response:
    policy.url(url)
    try:
        return requests.request(
            method, url, json=body, headers=_headers(), timeout=TIMEOUT_S, allow_redirects=False
        )
    except requests.RequestException as err:
        raise StorageError(f"the STAC API at {url} cannot be reached: {err}") from err


def check_api(url: str, policy: AccessPolicy) -> str:
    """The API's root URL, once it answers and supports Transactions."""
    root = url.rstrip("/")
    response = _request("GET", f"{root}/conformance", policy)
    if response.status_code >= 500:
        raise StorageError(f"the STAC API at {root} answered {response.status_code}")
    if response.status_code != 200:
        raise InvalidInputError(
            f"{root} is not a STAC API (GET /conformance: {response.status_code})"
        )
    try:
        classes = response.json().get("conformsTo", [])
    except ValueError as err:
        raise InvalidInputError(f"{root} is not a STAC API: /conformance is not JSON") from err
    if not any(str(c).endswith(TRANSACTIONS) for c in classes):
        raise InvalidInputError(
            f"the STAC API at {root} does not offer the Transactions extension: items cannot "
            "be published there"
        )
    return root


def for_api(document: dict[str, Any], href: str) -> dict[str, Any]:
    """A collection or item as an API takes it: no static links, absolute asset hrefs
    (resolved against ``href``, where the document was published)."""
    out = copy.deepcopy(document)
    out["links"] = [link for link in out.get("links", []) if link.get("rel") not in STATIC_RELS]
    for asset in out.get("assets", {}).values():
        asset["href"] = absolute(str(asset["href"]), href)
    return out


def absolute(href: str, base: str) -> str:
    """``href`` resolved against ``base`` (a URL or a local path)."""
    if urlsplit(href).scheme or href.startswith("/"):
        return href
    if urlsplit(base).scheme:
        return urljoin(base, href)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), href))


def _upsert(root: str, path: str, document: dict[str, Any], policy: AccessPolicy) -> None:
    """POST ``document`` to ``root + path``; PUT it to its own URL when it exists."""
    response = _request("POST", f"{root}{path}", policy, document)
    if response.status_code == 409:
        response = _request("PUT", f"{root}{path}/{document['id']}", policy, document)
    if response.status_code >= 300:
        what = "refused" if response.status_code < 500 else "failed on"
        raise StorageError(
            f"the STAC API at {root} {what} {document.get('type', 'document')} "
            f"{document['id']}: {response.status_code} "
            f"{response.text[:300]}"
        )


def publish_collection(
    root: str, collection: dict[str, Any], href: str, policy: AccessPolicy
) -> None:
    """Create or replace the collection (its extent grows with the batch)."""
    _upsert(root, "/collections", for_api(collection, href), policy)


def publish_item(root: str, item: dict[str, Any], href: str, policy: AccessPolicy) -> str:
    """Create or replace the item in its collection; its URL in the API."""
    path = f"/collections/{item['collection']}/items"
    _upsert(root, path, for_api(item, href), policy)
    return f"{root}{path}/{item['id']}"
