"""The service's settings: one object, each variable with one default, read in one place."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from kappamask import settings
from kappamask.errors import ConfigurationError
from kappamask.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "service" / "kappamask"
#: Launchers that hand an environment on: pygeoapi reads its configuration's path from
#: the environment only; a local Triton is a child process with its own.
LAUNCHERS = {"settings.py", "api/serve.py", "inference/server.py"}


def test_values_parse_from_the_environment_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    env = {
        "KAPPAMASK_PORT": "8080",
        "KAPPAMASK_DATA_ROOTS": f"{tmp_path}:/data",
        "KAPPAMASK_ALLOWED_HOSTS": "a.example, *.b.example",
        "KAPPAMASK_SERVE_OUTPUTS": "no",
        "KAPPAMASK_OUTPUT_DIR": str(tmp_path / "out"),
        "AWS_DEFAULT_REGION": "eu-central-1",
        "KAPPAMASK_STAC_API_AUTH": "Bearer s3cr3t",
        "KAPPAMASK_BROKER_URL": "  ",  # blank: unset
    }
    config = Settings.from_env(env)
    assert config.port == 8080 and config.data_roots == (tmp_path, Path("/data"))
    assert config.allowed_hosts == ("a.example", "*.b.example")
    assert config.s3_region == "eu-central-1" and config.broker_url is None
    # derived values: one rule each
    assert config.api_url == "http://localhost:8080" and config.results_url is None
    assert config.served_outputs is None
    assert config.jobs_database == str((tmp_path / "out").resolve() / ".jobs" / "jobs.tinydb")
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in settings.describe(config)
    assert Settings.from_env({}) == Settings()
    served = Settings.from_env({"KAPPAMASK_PUBLIC_URL": "https://masks.example/"})
    assert served.results_url == "https://masks.example/outputs"
    # flags given override; flags not given (None) leave the setting
    assert config.replace(port=None, host="0.0.0.0").port == 8080


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KAPPAMASK_PORT", "eighty"),
        ("KAPPAMASK_SERVE_OUTPUTS", "maybe"),
        ("KAPPAMASK_READ_TIMEOUT_S", "30s"),
        ("KAPPAMASK_TRITON_PROTOCOL", "ftp"),
        ("KAPPAMASK_CPU_PRECISION", "fp8"),
    ],
)
def test_a_value_that_does_not_parse_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=name) as raised:
        Settings.from_env({name: value})
    assert raised.value.http_status == 500  # the operator's to fix, not the client's


def test_a_launcher_installs_the_settings_the_service_reads() -> None:
    mine = Settings(max_concurrent_jobs=7)
    with settings.using(mine):
        assert settings.current() is mine
    assert settings.current() == Settings.from_env()


def test_the_environment_is_read_only_in_the_settings_and_the_launchers() -> None:
    reads = re.compile(r"os\.environ|os\.getenv|getenv\(")
    found = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if reads.search(path.read_text())
    ]
    assert found and set(found) <= LAUNCHERS, sorted(set(found) - LAUNCHERS)
    # every KAPPAMASK_ variable a service module names is a setting (the GeoTIFF tags of
    # a mask, keys of a dict, aside)
    declared = {n.strip("`") for names, *_ in settings.variables() for n in names.split(" or ")}
    named = set()
    for path in PACKAGE.rglob("*.py"):
        if "tools" not in path.parts:
            named |= set(re.findall(r'"(KAPPAMASK_[A-Z0-9_]+)"(?!\s*:)', path.read_text()))
    assert named and named <= declared, named - declared


def test_the_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings.markdown_table() in readme, "run `kappamask settings --markdown`"


def test_a_killed_launcher_s_pygeoapi_scratch_is_removed(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tempfile

    from kappamask.api.serve import SCRATCH_PREFIX, remove_stale_scratch

    probe = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    temp = Path(tempfile.gettempdir())
    stale = temp / f"{SCRATCH_PREFIX}{dead}-abc"
    mine = temp / f"{SCRATCH_PREFIX}{os.getpid()}-abc"
    for folder in (stale, mine):
        folder.mkdir(exist_ok=True)
        (folder / "openapi.yml").write_text("x")
    try:
        remove_stale_scratch()
        assert not stale.exists() and mine.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)
