"""Local paths: only inside the roots a server allows (no '..', no symlink escape)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kappamask.errors import AccessDeniedError, InvalidInputError

ROOTS_ENV = "KAPPAMASK_DATA_ROOTS"


def roots_from_env() -> list[Path]:
    """The roots listed in ``KAPPAMASK_DATA_ROOTS`` (separated by ':')."""
    return [Path(p) for p in os.environ.get(ROOTS_ENV, "").split(":") if p.strip()]


def check_local_path(href: str, roots: Sequence[Path] | None) -> Path:
    """Resolve ``href`` (symlinks included) and refuse it unless it lies in one of ``roots``.

    ``roots=None`` means no restriction (the command line, run by the data's owner).
    """
    if not href or "\x00" in href:
        raise InvalidInputError("product path is empty or malformed")
    if href.startswith("file:"):
        raise InvalidInputError("file:// URLs are not accepted: give a plain path")
    path = Path(href).expanduser()
    resolved = path.resolve()
    if roots is None:
        return resolved
    for root in roots:
        root_resolved = Path(root).expanduser().resolve()
        if resolved == root_resolved or root_resolved in resolved.parents:
            return resolved
    raise AccessDeniedError(f"{href} is outside the data roots this server allows")
