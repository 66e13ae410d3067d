"""Sources: turn what a user names into a Product.

A product reference is a local SAFE folder or zip, ``s3://bucket/...SAFE`` (or ``.zip``),
a STAC item (an http(s) URL, an ``s3://`` or local ``.json``) or a STAC item object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from kappamask.access import AccessPolicy
from kappamask.errors import InvalidInputError
from kappamask.reading import egress
from kappamask.sources.product import Product
from kappamask.sources.s3 import open_s3_safe
from kappamask.sources.safe import open_safe
from kappamask.sources.stac import fetch_item, item_from_dict, product_from_item

__all__ = ["Product", "describe_reference", "open_product", "open_safe"]

#: What names a product; an opened Product passes as it is.
ProductRef = str | os.PathLike[str] | Mapping[str, Any] | Product


def describe_reference(ref: ProductRef) -> str:
    """A short text naming a product reference, for logs and messages."""
    if isinstance(ref, Product):
        return ref.product_id
    if isinstance(ref, Mapping):
        return f"STAC item {str(ref.get('id', '?'))[:80]}"
    return os.fspath(ref)


def open_product(ref: ProductRef, policy: AccessPolicy | None = None) -> Product:
    """Resolve a product reference to a Product, within what ``policy`` allows."""
    policy = policy or AccessPolicy.unrestricted()
    egress.install(policy)  # before any band is read: GDAL's every hop passes the policy
    if isinstance(ref, Product):
        return ref
    if isinstance(ref, Mapping):
        return product_from_item(item_from_dict(ref), policy)
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidInputError("the product reference is empty")
    ref = ref.strip()
    scheme = urlsplit(ref).scheme.lower()
    is_json = ref.lower().split("?")[0].endswith(".json")
    if scheme in {"http", "https"}:
        return product_from_item(fetch_item(ref, policy), policy, ref)
    if scheme == "s3":
        if is_json:
            return product_from_item(fetch_item(ref, policy), policy, ref)
        return open_s3_safe(ref, policy.s3)
    if scheme and len(scheme) > 1:  # one letter: a Windows drive
        raise InvalidInputError(
            f"{scheme}:// is not accepted: give a path, an s3:// URL or an http(s) STAC item URL"
        )
    if is_json:
        return product_from_item(fetch_item(ref, policy), policy, ref)
    return open_safe(policy.local_input(ref), policy)
