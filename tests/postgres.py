"""A throw-away PostgreSQL cluster of the Debian packages (with PostGIS), for the tests
that need a real database: pygeoapi's PostgreSQL job manager, pgstac under a STAC API."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kappamask.inference.server import free_port

from .processes import apt_install

#: What the Debian packages put where; .ci/run installs them (the fixture too, as root).
APT_PACKAGES = ["postgresql", "postgis"]


def _postgres_bin() -> Path:
    """The PostgreSQL binaries (initdb, pg_ctl), installed from Debian when missing and
    allowed (root, as in CI)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    postgis = glob.glob("/usr/share/postgresql/*/extension/postgis.control")
    if not found or not postgis:
        apt_install(APT_PACKAGES)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        postgis = glob.glob("/usr/share/postgresql/*/extension/postgis.control")
    if not found or not postgis:
        pytest.fail(
            f"the STAC API tests need PostgreSQL and PostGIS: apt-get install "
            f"{' '.join(APT_PACKAGES)}"
        )
    return Path(found[-1]).parent


def _as_postgres(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL server command as the postgres user when root (it refuses root)."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    return done


@contextmanager
def postgis_cluster() -> Iterator[str]:
    """A throw-away PostgreSQL cluster with PostGIS available; its DSN."""
    bindir = _postgres_bin()
    # pytest's own temporary folders are closed to other users, the postgres one included
    base = Path(tempfile.mkdtemp(prefix="kappamask-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    data = base / "data"
    port = free_port()
    _as_postgres(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        timeout=120,
    )
    _as_postgres(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-t",
            "60",
            "-l",
            str(base / "postgres.log"),
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        timeout=120,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], timeout=120)
        shutil.rmtree(base, ignore_errors=True)
