"""Sinks for results: files appear at their final names only once the whole result is
complete, the STAC item last; a failed or cancelled run leaves nothing behind."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from kappamask.errors import InvalidInputError

LOGGER = logging.getLogger(__name__)


class LocalSink:
    """Stage files in a hidden folder inside ``out_dir`` (same file system, so the final
    move is an atomic rename) and move them in on ``commit``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.staging = self.out_dir / f".kappamask-staging-{uuid.uuid4().hex}"

    def __enter__(self) -> LocalSink:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()
        except OSError as err:
            raise InvalidInputError(
                f"cannot write results to {self.out_dir}: {err.strerror}"
            ) from err
        return self

    def path(self, name: str) -> Path:
        """Where to write ``name`` while the result is incomplete."""
        return self.staging / name

    def final_path(self, name: str) -> Path:
        return self.out_dir / name

    def commit(self, names: Sequence[str]) -> list[Path]:
        """Move ``names`` to their final place, in order (put the STAC item last)."""
        final = []
        for name in names:
            target = self.final_path(name)
            os.replace(self.staging / name, target)
            final.append(target)
        return final

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
