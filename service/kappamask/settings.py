"""The service's runtime settings: every ``KAPPAMASK_*`` environment variable, its one
default, read once.

The launchers (`kappamask serve`, `kappamask worker`, the deployment's ``kappamask.api.wsgi``)
build a ``Settings`` from the environment and their command-line flags and install it
with ``use``; the processes, the job queue, Triton's supervisor and the access policy take
theirs from ``current()``. Nothing else in the service reads the environment: only the
launchers that hand an environment to what they start (Triton, pygeoapi's configuration
path) write it.

``markdown_table()`` is the README's table of variables (tests/test_readme.py checks that
they agree); ``kappamask settings`` prints it with this process's values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kappamask.errors import ConfigurationError
from kappamask.storage.s3 import S3Settings

#: Where the service serves its output folder (GET /outputs/...).
OUTPUTS_ROUTE = "/outputs"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE | _FALSE:
        raise ValueError("not true or false")
    return value in _TRUE


def _text(text: str) -> str | None:
    return text.strip() or None


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in text.split(":") if p.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip() not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return text.strip()

    return parse


def _path(text: str) -> Path | None:
    return Path(text) if text.strip() else None


def _setting(
    env: str | tuple[str, ...],
    default: Any,
    parse: Callable[[str], Any],
    doc: str,
    secret: bool = False,
) -> Any:
    """A field read from ``env`` (the first of several names that is set), with its
    default and the README's description."""
    names = (env,) if isinstance(env, str) else env
    meta = {"env": names, "parse": parse, "doc": doc, "secret": secret}
    return field(default=default, repr=not secret, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Runtime settings of one service process (frozen: a change is a new object)."""

    # Triton
    triton_url: str | None = _setting(
        "KAPPAMASK_TRITON_URL",
        None,
        _text,
        "Triton's host:port; unset: `serve`, `worker` and `run` start a local Triton "
        "(the deployment's API containers need it)",
    )
    triton_protocol: str = _setting(
        "KAPPAMASK_TRITON_PROTOCOL",
        "http",
        _one_of("http", "grpc"),
        "protocol to Triton: http or grpc",
    )
    model_repository: Path | None = _setting(
        "KAPPAMASK_MODEL_REPOSITORY",
        None,
        _path,
        "model repository of the local Triton (unset: the project's triton_models/)",
    )
    triton_wait_s: float = _setting(
        "KAPPAMASK_TRITON_WAIT_S",
        900.0,
        float,
        "seconds `kappamask wait-triton` (the API container's start) waits for Triton "
        "(TensorRT engines take minutes to load)",
    )
    triton_restart_delay_s: float = _setting(
        "KAPPAMASK_TRITON_RESTART_DELAY_S",
        1.0,
        float,
        "seconds before a dead local Triton is restarted, doubled on each restart in a row",
    )
    cpu_runtime: str | None = _setting(
        "KAPPAMASK_CPU_RUNTIME",
        None,
        _one_of("openvino", "onnxruntime"),
        "force the CPU models' runtime (openvino, onnxruntime); unset: OpenVINO if installed",
    )
    cpu_precision: str = _setting(
        "KAPPAMASK_CPU_PRECISION",
        "auto",
        _one_of("auto", "bf16", "f32", "int8"),
        "force the CPU models' precision (bf16, f32, int8); auto: the fastest that keeps to "
        "FP32's classes",
    )
    ort_threads: int | None = _setting(
        "KAPPAMASK_ORT_THREADS",
        None,
        int,
        "ONNX Runtime threads of the local Triton's CPU models (unset: every core)",
    )
    # the HTTP API
    host: str = _setting("KAPPAMASK_HOST", "127.0.0.1", str.strip, "address the API binds")
    port: int = _setting("KAPPAMASK_PORT", 5000, int, "port the API binds")
    public_url: str | None = _setting(
        "KAPPAMASK_PUBLIC_URL",
        None,
        _text,
        "the API's URL as clients reach it; results name their files under it "
        "(unset: http://localhost:PORT)",
    )
    output_dir: Path = _setting(
        "KAPPAMASK_OUTPUT_DIR", Path("kappamask-results"), Path, "where results are written"
    )
    serve_outputs: bool = _setting(
        "KAPPAMASK_SERVE_OUTPUTS",
        True,
        _flag,
        "serve the output folder at /outputs (false: results name server paths, or "
        "KAPPAMASK_OUTPUTS_URL)",
    )
    outputs_url: str | None = _setting(
        "KAPPAMASK_OUTPUTS_URL",
        None,
        _text,
        "URL at which the output folder is published (unset: PUBLIC_URL/outputs)",
    )
    data_roots: tuple[Path, ...] = _setting(
        "KAPPAMASK_DATA_ROOTS",
        (),
        _paths,
        "folders whose products may be processed, `:`-separated (unset: the current folder)",
    )
    allowed_hosts: tuple[str, ...] = _setting(
        "KAPPAMASK_ALLOWED_HOSTS",
        (),
        _names,
        "http(s) hosts STAC items and assets may come from, comma-separated (unset: Earth "
        "Search, Planetary Computer, CDSE)",
    )
    allow_private_networks: bool = _setting(
        "KAPPAMASK_ALLOW_PRIVATE_NETWORKS",
        False,
        _flag,
        "let URLs reach loopback and private addresses (a local MinIO or STAC API)",
    )
    max_concurrent_jobs: int = _setting(
        "KAPPAMASK_MAX_CONCURRENT_JOBS",
        2,
        int,
        "pipelines one API process runs at once; more wait with status accepted",
    )
    # an execute request is a few kB: a STAC item or an AOI of thousands of vertices stays
    # far below 1 MiB
    max_request_bytes: int = _setting(
        "KAPPAMASK_MAX_REQUEST_BYTES", 1024 * 1024, int, "largest request body (then 413)"
    )
    # a 1 MiB body over a slow mobile link takes a few seconds
    read_timeout_s: float = _setting(
        "KAPPAMASK_READ_TIMEOUT_S",
        30.0,
        float,
        "seconds a request's head, then its whole body, may take to arrive (then 408)",
    )
    log_level: str = _setting("KAPPAMASK_LOG_LEVEL", "INFO", str.strip, "pygeoapi's log level")
    pygeoapi_config: Path | None = _setting(
        "KAPPAMASK_PYGEOAPI_CONFIG",
        None,
        _path,
        "pygeoapi configuration the launchers fill in (unset: the project's pygeoapi-config.yml)",
    )
    # jobs
    job_manager: str = _setting(
        "KAPPAMASK_JOB_MANAGER",
        "kappamask.jobs.managers.TinyDBManager",
        str.strip,
        "pygeoapi job manager: ...TinyDBManager (one process) or ...PostgreSQLManager",
    )
    jobs_db: str | None = _setting(
        "KAPPAMASK_JOBS_DB",
        None,
        _text,
        "the job database: a TinyDB file or a postgresql:// DSN (unset: "
        "OUTPUT_DIR/.jobs/jobs.tinydb)",
    )
    job_output_dir: Path | None = _setting(
        "KAPPAMASK_JOB_OUTPUT_DIR",
        None,
        _path,
        "pygeoapi's folder of job results (unset: OUTPUT_DIR/.jobs)",
    )
    broker_url: str | None = _setting(
        "KAPPAMASK_BROKER_URL",
        None,
        _text,
        "Redis URL of the job queue: jobs run on `kappamask worker` processes (unset: in "
        "the API process's threads)",
    )
    queue_visibility_s: int = _setting(
        "KAPPAMASK_QUEUE_VISIBILITY_S",
        3 * 3600,
        int,
        "seconds after which a job whose worker died goes to another worker",
    )
    # S3 and STAC APIs
    s3_endpoint_url: str | None = _setting(
        ("KAPPAMASK_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        None,
        _text,
        "S3 endpoint (MinIO, CDSE, ...; unset: AWS)",
    )
    s3_region: str | None = _setting(("AWS_REGION", "AWS_DEFAULT_REGION"), None, _text, "S3 region")
    s3_access_key_id: str | None = _setting(
        "AWS_ACCESS_KEY_ID", None, _text, "S3 key id", secret=True
    )
    s3_secret_access_key: str | None = _setting(
        "AWS_SECRET_ACCESS_KEY", None, _text, "S3 secret key", secret=True
    )
    s3_session_token: str | None = _setting(
        "AWS_SESSION_TOKEN", None, _text, "S3 session token", secret=True
    )
    s3_requester_pays: bool = _setting(
        "KAPPAMASK_S3_REQUESTER_PAYS",
        False,
        _flag,
        "pay for reads of requester-pays buckets (sentinel-s2-l1c)",
    )
    s3_anonymous: bool = _setting(
        "KAPPAMASK_S3_ANONYMOUS", False, _flag, "unsigned S3 requests (public buckets)"
    )
    s3_public_url: str | None = _setting(
        "KAPPAMASK_S3_PUBLIC_URL",
        None,
        _text,
        "https template of published objects, e.g. https://{bucket}.s3.REGION.amazonaws.com/{key}",
    )
    stac_api_auth: str | None = _setting(
        "KAPPAMASK_STAC_API_AUTH",
        None,
        _text,
        "`Authorization` header sent to STAC APIs results are published to",
        secret=True,
    )
    #: Set by `kappamask worker` (never from the environment): jobs are run here rather
    #: than queued.
    queue_worker: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives, defaults for the rest; a value that does not
        parse is a ConfigurationError naming its variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            names = f.metadata.get("env", ())
            name = next((n for n in names if env.get(n, "").strip()), None)
            if name is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](env[name])
            except ValueError as err:
                raise ConfigurationError(f"{name}={env[name]!r} is not valid: {err}") from err
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """These settings with ``changes`` (None values left out: a flag not given)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def api_url(self) -> str:
        """The API's URL as clients reach it."""
        return (self.public_url or f"http://localhost:{self.port}").rstrip("/")

    @property
    def results_url(self) -> str | None:
        """The URL results name their files by: where the output folder is published, or
        None (server paths)."""
        if self.outputs_url:
            return self.outputs_url.rstrip("/")
        return self.api_url + OUTPUTS_ROUTE if self.serve_outputs else None

    @property
    def served_outputs(self) -> Path | None:
        """The output folder the API serves at /outputs, or None."""
        return self.output_dir.resolve() if self.serve_outputs else None

    @property
    def jobs_folder(self) -> Path:
        """pygeoapi's folder of job results (and the TinyDB file by default)."""
        return self.job_output_dir or self.output_dir.resolve() / ".jobs"

    @property
    def jobs_database(self) -> str:
        return self.jobs_db or str(self.jobs_folder / "jobs.tinydb")

    @property
    def roots(self) -> tuple[Path, ...]:
        """The data roots; the current folder where none are set."""
        return self.data_roots or (Path("."),)

    def s3(self) -> S3Settings:
        return S3Settings(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=self.s3_secret_access_key,
            session_token=self.s3_session_token,
            requester_pays=self.s3_requester_pays,
            anonymous=self.s3_anonymous,
            public_url=self.s3_public_url,
        )

    def triton_environment(self) -> dict[str, str]:
        """What a local Triton's CPU models read from their environment
        (triton_models/cpu_model.py runs in Triton's process, not in this one)."""
        env = {
            "KAPPAMASK_ORT_THREADS": str(self.ort_threads or os.cpu_count() or 1),
            "KAPPAMASK_CPU_PRECISION": self.cpu_precision,
        }
        if self.cpu_runtime:
            env["KAPPAMASK_CPU_RUNTIME"] = self.cpu_runtime
        return env


_CURRENT: Settings | None = None


def current() -> Settings:
    """This process's settings: those a launcher installed, else the environment's (read
    once)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Settings.from_env()
    return _CURRENT


def use(settings: Settings | None) -> None:
    """Install ``settings`` as this process's (None: read the environment again on next
    use)."""
    global _CURRENT
    _CURRENT = settings


@contextmanager
def using(settings: Settings) -> Iterator[Settings]:
    """``settings`` installed for a block (tests, a tool that runs the service's code)."""
    before = _CURRENT
    use(settings)
    try:
        yield settings
    finally:
        use(before)


def variables() -> Iterator[tuple[str, Any, str, bool]]:
    """(variable names, default, description, secret) of every setting read from the
    environment."""
    for f in fields(Settings):
        if "env" in f.metadata:
            names = " or ".join(f"`{n}`" for n in f.metadata["env"])
            yield names, f.default, f.metadata["doc"], f.metadata["secret"]


def _shown(value: Any) -> str:
    if value is None or value == ():
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ":".join(str(v) for v in value)
    return str(value)


def markdown_table() -> str:
    """The README's table of environment variables."""
    lines = ["| variable | default | what it sets |", "| --- | --- | --- |"]
    for names, default, doc, _secret in variables():
        shown = _shown(default)
        lines.append(f"| {names} | {f'`{shown}`' if shown else ''} | {doc} |")
    return "\n".join(lines) + "\n"


def describe(settings: Settings) -> str:
    """Each variable with this process's value (secrets shown as set or not)."""
    rows = []
    for f in fields(Settings):
        if "env" not in f.metadata:
            continue
        value = getattr(settings, f.name)
        shown = ("(set)" if value else "") if f.metadata["secret"] else _shown(value)
        rows.append(f"{f.metadata['env'][0]:<34} {shown}")
    return "\n".join(rows)
