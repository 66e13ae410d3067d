"""Sources: turn what a user names (a SAFE folder or zip) into a Product."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kappamask.sources.local import check_local_path
from kappamask.sources.product import Product
from kappamask.sources.safe import open_safe

__all__ = ["Product", "open_product", "open_safe"]


def open_product(href: str, allowed_roots: Sequence[Path] | None = None) -> Product:
    """Resolve a product reference to a Product (local SAFE folder or zip)."""
    return open_safe(check_local_path(href, allowed_roots))
