"""Start, supervise and stop a local Triton Inference Server on a CPU host (no Docker).

Uses the real ``tritonserver`` binary and Python backend shipped in the nvidia-pytriton
wheel (extra ``triton``). Triton runs in a process group of its own with its Python
backend stubs; the group dies with the process that started it, so a Ctrl-C or a crash
of ``kappamask serve`` never leaves an orphan behind. A supervisor thread restarts a
Triton that died (bounded retries with back-off) on the same ports, killing the stubs
the dead server left; between the death and the restart ``ready`` is false.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from kappamask import settings
from kappamask.errors import InferenceUnavailableError, NoModelError
from kappamask.inference.cpu import announce_host_runtime
from kappamask.inference.repository import DEFAULT_REPOSITORY, servable_models
from kappamask.settings import Settings

LOGGER = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
#: Restarts of a Triton that died, before the supervisor gives up (health stays 503).
MAX_RESTARTS = 5
# The first restart waits ``Settings.triton_restart_delay_s`` (1 s: within the client's
# retries of 3.5 s a running job may not notice at all), doubled after each failed one.
#: A Triton up this long since its last restart has its restart budget back.
STABLE_AFTER_S = 300.0


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as err:
        raise InferenceUnavailableError(
            "no local Triton: install the 'triton' extra (nvidia-pytriton) or pass --triton-url"
        ) from err
    return Path(pytriton.__file__).parent / "tritonserver"


def _backend_dir(root: Path) -> Path:
    """A backend folder with the Python backend and the stub for this interpreter.

    The wheel keeps the stubs apart from ``backends/python``; Triton wants them together.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise InferenceUnavailableError(
            f"the Triton wheel has no Python backend stub for {version}"
        )
    target = Path(tempfile.gettempdir()) / f"kappamask-triton-backends-{os.getuid()}-{version}"
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends/python/libtriton_python.so",
        root / "backends/python/triton_python_backend_utils.py",
        stub,
    ):
        link = python / src.name
        if link.is_symlink() and link.resolve() == src.resolve():
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(src)
    return target


def _environment(root: Path, config: Settings) -> dict[str, str]:
    env = dict(os.environ)
    # The stub must load the interpreter's own libpython and find the venv's packages
    # through the python3 on PATH (it ignores PYTHONPATH/PYTHONHOME).
    libdirs = [
        sysconfig.get_config_var("LIBDIR") or "",
        str(root.parent.parent / "nvidia_pytriton.libs"),
    ]
    env["LD_LIBRARY_PATH"] = ":".join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")])
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(config.triton_environment())
    return env


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalTriton:
    """A tritonserver child process serving the models of ``repository`` that have weights.

    >>> with LocalTriton() as triton:   # doctest: +SKIP
    ...     print(triton.http_url)
    """

    def __init__(
        self,
        repository: Path = DEFAULT_REPOSITORY,
        models: Sequence[str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        supervise: bool = True,
        config: Settings | None = None,
    ) -> None:
        #: The settings it runs with (CPU runtime and precision, restart delay).
        self.config = config or settings.current()
        self.repository = Path(repository).resolve()
        self.models = servable_models(self.repository, models)
        if not self.models:
            raise NoModelError(f"no model in {self.repository} has weights (model.onnx)")
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.log_path = (
            log_path or Path(tempfile.gettempdir()) / f"kappamask-triton-{self.http_port}.log"
        )
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.supervise = supervise
        self.restarts = 0  # restarts since the server was last stable
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        root = _pytriton_root()
        cmd = [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={_backend_dir(root)}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            "--strict-readiness=true",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--exit-timeout-secs=5",
        ]
        return cmd

    @property
    def ready(self) -> bool:
        """Whether Triton is up and was ready when last looked at (false while restarting)."""
        return self._ready.is_set() and self.process is not None and self.process.poll() is None

    def start(self) -> LocalTriton:
        """Launch tritonserver, wait until it reports ready, then supervise it."""
        self._stopping.clear()
        announce_host_runtime(self.config)
        self._launch()
        if self.supervise:
            self._supervisor = threading.Thread(
                target=self._watch, name="triton-supervisor", daemon=True
            )
            self._supervisor.start()
        return self

    def _launch(self) -> None:
        root = _pytriton_root()
        LOGGER.info(
            "starting Triton on %s with %s (log: %s)",
            self.http_url,
            ", ".join(self.models),
            self.log_path,
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_environment(root, self.config),
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self.process.poll() is not None:
                tail = self.log_tail()
                self._kill_group()
                raise InferenceUnavailableError(
                    f"tritonserver exited with code {self.process.returncode}:\n{tail}"
                )
            try:
                if (
                    requests.get(f"http://{self.http_url}/v2/health/ready", timeout=2).status_code
                    == 200
                ):
                    LOGGER.info("Triton ready")
                    self._ready.set()
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        tail = self.log_tail()
        self._kill_group()
        raise InferenceUnavailableError(
            f"Triton not ready after {self.ready_timeout:.0f} s:\n{tail}"
        )

    def _watch(self) -> None:
        """Restart Triton when it dies, with back-off, until ``MAX_RESTARTS`` fail in a row."""
        up_since = time.monotonic()
        while not self._stopping.wait(0.5):
            process = self.process
            if process is None or process.poll() is None:
                if self.restarts and time.monotonic() - up_since > STABLE_AFTER_S:
                    self.restarts = 0
                continue
            self._ready.clear()
            tail = self.log_tail(10)
            self._kill_group()  # the backend stubs outlive a killed server otherwise
            if self.restarts >= MAX_RESTARTS:
                LOGGER.critical(
                    "Triton exited with code %s and %d restarts failed: inference stays "
                    "unavailable until the service is restarted\n%s",
                    process.returncode,
                    self.restarts,
                    tail,
                )
                return
            first = self.config.triton_restart_delay_s
            delay = first * 2**self.restarts
            self.restarts += 1
            LOGGER.error(
                "Triton exited with code %s; restarting in %.0f s (attempt %d of %d)\n%s",
                process.returncode,
                delay,
                self.restarts,
                MAX_RESTARTS,
                tail,
            )
            if self._stopping.wait(delay):
                return
            try:
                self._launch()
                up_since = time.monotonic()
            except InferenceUnavailableError as err:
                LOGGER.error("Triton restart failed: %s", err)

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of Triton's process group (its stubs), reap the server."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # group already gone
            os.killpg(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            LOGGER.warning("tritonserver %d did not exit after SIGKILL", self.process.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop supervising; SIGTERM the server, SIGKILL its group if it has not exited
        within 20 s (and always its stubs); remove the log."""
        self._stopping.set()
        self._ready.clear()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=30)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                LOGGER.warning("Triton did not stop within 20 s: killing it")
            LOGGER.info("Triton stopped")
        self._kill_group()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TritonEndpoint:
    """The Triton a command talks to, and how to ask whether it is ready."""

    url: str
    protocol: str
    ready: Callable[[], bool]


def triton_endpoint(stack: contextlib.ExitStack, config: Settings) -> TritonEndpoint:
    """``config``'s Triton (one someone else runs), or a supervised local Triton on its
    model repository that stops when ``stack`` closes: what `run`, `serve` and `worker` do."""
    protocol = config.triton_protocol
    if config.triton_url is not None:
        from kappamask.inference.triton import server_ready

        external = config.triton_url
        return TritonEndpoint(external, protocol, lambda: server_ready(external, protocol))
    repository = config.model_repository or DEFAULT_REPOSITORY
    triton = stack.enter_context(LocalTriton(repository, config=config))
    local = triton.grpc_url if protocol == "grpc" else triton.http_url
    return TritonEndpoint(local, protocol, lambda: triton.ready)
