"""Client of the Triton Inference Server: model discovery, batched crops in, masks out.

Several requests are kept in flight (one crop each) so that Triton's dynamic batcher can
fill its batches; each worker thread has its own connection (the tritonclient HTTP
client is not shared across threads). Crops go as FP16 (half the bytes of FP32) and
come back as three UINT8 planes (class, confidence, cloud probability).

Where Triton shares this host's memory (the local Triton that ``kappamask run`` and
``kappamask serve`` start), each thread writes its crops into a system shared-memory
region registered with Triton instead of the request body: no copies into the body, no
6.8 MB per crop through the socket on either side (measured on a full product on 2 cores:
5.5 core-seconds of the client's and Triton's work). A Triton elsewhere cannot open the
region; the first refusal switches the client to the request body.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from kappamask.bands import MODEL_NAMES
from kappamask.errors import InferenceUnavailableError, InvalidInputError, NoModelError
from kappamask.inference.cpu import resolve
from kappamask.inference.model_spec import (
    ARCHITECTURE_UNET,
    INPUT,
    OFFSET_RULES,
    OFFSET_TRAINING,
    ORIGIN_UNKNOWN,
    OUTPUT_SCORES,
    OUTPUTS,
    ModelSpec,
    decide,
    parse_agreements,
)

LOGGER = logging.getLogger(__name__)

PROTOCOLS = ("http", "grpc")
#: Requests sent at once. Each spends part of its round trip in transfer (HTTP, then
#: Triton to its Python backend stub), so a model instance is kept busy only with the
#: next requests already queued behind it: measured through the local CPU Triton (two
#: instances) on 2 cores, 5.9 crops/s with 2, 8.4 with 4, 10.9 with 8 (the OpenVINO floor
#: is 11.6), no more with 12 or 16.
DEFAULT_IN_FLIGHT = 8
#: Transient failures worth a retry: server busy or restarting, connection dropped.
_RETRY_STATUSES = {"502", "503", "504", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}


#: What the transports raise when the server goes away: socket errors (refused, reset,
#: timed out) and, from the HTTP client's parser, "connection closed." when Triton dies in
#: the middle of an answer (an http.client.HTTPException).
_CONNECTION_ERRORS = (OSError, http.client.HTTPException)


class CropOutputs(NamedTuple):
    """What the model says of one crop: its four class scores, uint8 [4, 512, 512]
    (``SCORE_CLASSES`` order, x 255), which the mosaic blends; the properties decide one
    crop on its own, as the served graph does."""

    scores: np.ndarray

    @property
    def classes(self) -> np.ndarray:
        return decide(self.scores)[0]

    @property
    def confidence(self) -> np.ndarray:
        return decide(self.scores)[1]

    @property
    def probability(self) -> np.ndarray:
        return decide(self.scores)[2]


def _agreements(name: str, params: dict[str, str]) -> tuple[float | None, float | None]:
    """A config's measured bf16 and INT8 agreements (None where not measured)."""
    try:
        return parse_agreements(params)
    except ValueError as err:
        raise NoModelError(f"{name}: {err}") from err


def normalise_url(url: str) -> str:
    """tritonclient wants host:port; accept http:// and grpc:// prefixes too."""
    for prefix in ("http://", "https://", "grpc://"):
        if url.startswith(prefix):
            return url[len(prefix) :].rstrip("/")
    return url.rstrip("/")


def server_ready(url: str, protocol: str = "http", timeout_s: float = 2.0) -> bool:
    """Whether the Triton at ``url`` answers ready now (a health check: never raises)."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as grpc_module

            with grpc_module.InferenceServerClient(normalise_url(url)) as grpc_client:
                return bool(grpc_client.is_server_ready(client_timeout=timeout_s))
        import tritonclient.http as http_module

        with http_module.InferenceServerClient(
            normalise_url(url), connection_timeout=timeout_s, network_timeout=timeout_s
        ) as http_client:
            return bool(http_client.is_server_ready())
    except Exception:  # any failure to answer is "not ready"
        return False


def _shm_has_room(nbytes: int) -> bool:
    """Whether /dev/shm has room for a region of ``nbytes`` and as much again to spare."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= 2 * nbytes


class TritonClient:
    """Talks to one Triton server over HTTP (default) or gRPC."""

    def __init__(
        self,
        url: str,
        protocol: str = "http",
        in_flight: int = DEFAULT_IN_FLIGHT,
        timeout_s: float = 600.0,
        retries: int = 3,
        shared_memory: bool = True,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InvalidInputError(f"protocol must be one of {PROTOCOLS}")
        self.url = normalise_url(url)
        self.protocol = protocol
        self.in_flight = max(1, in_flight)
        self.timeout_s = timeout_s
        self.retries = retries
        self._local = threading.local()
        self._input_dtypes: dict[str, str] = {}  # FP16 unless a config says FP32 (OpenVINO)
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="triton")
        #: Whether crops go through shared memory: until Triton refuses a region.
        self.shared_memory = shared_memory
        self._regions: list[tuple[str, Any]] = []  # (name, handle) of every thread's region
        self._connections: list[Any] = []  # every thread's, closed with the client
        self._regions_lock = threading.Lock()

    # -- connection -------------------------------------------------------------------
    def _connect(self) -> tuple[Any, Any]:
        """A new connection, and the tritonclient module of the protocol."""
        if self.protocol == "http":
            import tritonclient.http as module

            client = module.InferenceServerClient(
                self.url, connection_timeout=30.0, network_timeout=self.timeout_s
            )
        else:
            import tritonclient.grpc as module

            client = module.InferenceServerClient(self.url)
        return client, module

    def _client(self) -> Any:
        """This thread's connection."""
        client = getattr(self._local, "client", None)
        if client is None:
            client, self._local.module = self._connect()
            self._local.client = client
            with self._regions_lock:
                self._connections.append(client)
        return client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except InferenceServerException as err:
                if str(err.status()) not in _RETRY_STATUSES or attempt == self.retries:
                    raise InferenceUnavailableError(
                        f"Triton at {self.url}: {what} failed: {err.message()}"
                    ) from err
            except _CONNECTION_ERRORS as err:  # refused, reset, closed mid-answer, timed out
                if attempt == self.retries:
                    raise InferenceUnavailableError(
                        f"Triton at {self.url} stopped answering ({what}: {err}); nothing was "
                        "published, so the job can be run again once the service's "
                        "/health/ready answers 200"
                    ) from err
                self._local.client = None
            LOGGER.warning(
                "Triton %s failed (attempt %d), retrying in %.1f s", what, attempt + 1, delay
            )
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the server reports ready, or raise InferenceUnavailableError."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self._client().is_server_ready():
                    return
            except Exception as err:
                last = err
                self._local.client = None
            time.sleep(0.5)
        raise InferenceUnavailableError(
            f"Triton at {self.url} is not ready ({last or 'not ready'})"
        )

    # -- models -----------------------------------------------------------------------
    def model(self, level: str, requested: str | None = None) -> ModelSpec:
        """The served model for a processing level, with its features and constants.

        ``requested`` names another model of the repository, as ``name`` or
        ``name:version_label``; it must be served and declare the same level.
        """
        if level not in MODEL_NAMES:
            raise InvalidInputError(f"level must be L1C or L2A, not {level!r}")
        name, _, version = (requested or MODEL_NAMES[level]).partition(":")
        client = self._client()
        ready = self._call("model readiness", client.is_model_ready, name)
        if not ready:
            if requested:
                raise NoModelError(f"model {name} is not served by Triton at {self.url}")
            raise NoModelError(
                f"no model for {level}: Triton at {self.url} does not serve {name} "
                "(install weights with `kappamask install-model`)"
            )
        if self.protocol == "grpc":
            config = self._call("model config", client.get_model_config, name, as_json=True)[
                "config"
            ]
        else:
            config = self._call("model config", client.get_model_config, name)
        params = {
            k: v.get("string_value", v.get("stringValue", ""))
            for k, v in config.get("parameters", {}).items()
        }
        try:
            features = tuple(params["features"].split(","))
            max_v = tuple(float(v) for v in params["max_v"].split(","))
        except (KeyError, ValueError) as err:
            raise NoModelError(
                f"{name} does not declare its features and max_v parameters"
            ) from err
        agreements = _agreements(name, params)
        runtime, precision = resolve(
            params.get("runtime", ""),
            params.get("precision", ""),
            bool(params.get("int8_file")),
            *agreements,
        )
        first_input = config["input"][0]
        dtype = str(first_input.get("data_type", first_input.get("dataType", "TYPE_FP16")))
        dtype = dtype.removeprefix("TYPE_")
        if dtype not in ("FP16", "FP32"):
            raise NoModelError(f"{name} takes {dtype} input; FP16 or FP32 expected")
        spec = ModelSpec(
            name,
            params.get("level", level),
            features,
            max_v,
            params.get("version_label", "unversioned"),
            params.get("origin") or ORIGIN_UNKNOWN,
            params.get("onnx_sha256", ""),
            runtime,
            precision,
            dtype,
            *agreements,
            architecture=params.get("architecture") or ARCHITECTURE_UNET,
            weights_sha256=params.get("weights_sha256", ""),
            parent_sha256=params.get("parent_sha256", ""),
            offset_rule=params.get("offset_rule") or OFFSET_TRAINING,
        )
        if spec.offset_rule not in OFFSET_RULES:
            raise NoModelError(
                f"{name} declares the offset rule {spec.offset_rule!r}, not one of {OFFSET_RULES}"
            )
        self._input_dtypes[name] = dtype
        declared = {str(o.get("name")) for o in config.get("output", [])}
        if not set(OUTPUTS) <= declared:
            raise NoModelError(
                f"model {name} lacks the output(s) {sorted(set(OUTPUTS) - declared)}: install "
                "it again with `kappamask install-model`, which adds them to its graph"
            )
        if spec.level != level:
            raise NoModelError(f"model {name} is for {spec.level} products, not {level}")
        if version and version != spec.version_label:
            raise NoModelError(
                f"model {name} is at version {spec.version_label}, not {version} as requested"
            )
        return spec

    # -- inference --------------------------------------------------------------------
    def _region(self, client: Any, nbytes: int) -> Any | None:
        """This thread's shared-memory region of at least ``nbytes``, registered with
        Triton through ``client`` (again after a reconnection); None where Triton cannot
        read this host's shared memory."""
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        if not self.shared_memory:
            return None
        region = getattr(self._local, "region", None)
        if region is not None and region[2] >= nbytes and region[3] is client:
            return region
        if not _shm_has_room(nbytes):
            return None  # a small /dev/shm (a container's 64 MB): writing past it is SIGBUS
        name = f"kappamask-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            handle = shm.create_shared_memory_region(name, f"/{name}", nbytes)
        except shm.SharedMemoryException as err:
            LOGGER.info("no shared memory for crops (%s): they go in the request body", err)
            return None
        with self._regions_lock:
            self._regions.append((name, handle))
        try:
            client.register_system_shared_memory(name, f"/{name}", nbytes)
        except (InferenceServerException, *_CONNECTION_ERRORS) as err:
            self.shared_memory = False
            LOGGER.info(
                "Triton at %s cannot read this host's shared memory (%s): crops go "
                "in the request body",
                self.url,
                err,
            )
            return None
        self._local.region = (name, handle, nbytes, client)
        return self._local.region

    def _infer_one(self, model: str, crop: np.ndarray) -> CropOutputs:
        import tritonclient.utils.shared_memory as shm

        client = self._client()
        module = self._local.module
        dtype = self._input_dtypes.get(model, "FP16")
        # the crop as it is (a view into the reader's chunk) when it has the model's dtype:
        # it is copied once, into the shared region or the request body
        batch = crop[None].astype(np.float16 if dtype == "FP16" else np.float32, copy=False)
        inp = module.InferInput(INPUT, list(batch.shape), dtype)
        region = self._region(client, batch.nbytes)
        if region is not None:
            shm.set_shared_memory_region(region[1], [batch])
            inp.set_shared_memory(region[0], batch.nbytes)
        elif self.protocol == "http":
            inp.set_data_from_numpy(batch, binary_data=True)
        else:
            inp.set_data_from_numpy(batch)
        binary = {"binary_data": True} if self.protocol == "http" else {}
        outputs = [module.InferRequestedOutput(OUTPUT_SCORES, **binary)]
        try:
            result = self._call("inference", client.infer, model, [inp], outputs=outputs)
        except InferenceUnavailableError as err:
            if region is None or "shared memory" not in str(err):
                raise
            # Triton restarted and forgot the region: register it again, once
            self._local.region = None
            return self._infer_one(model, crop)
        scores = result.as_numpy(OUTPUT_SCORES)
        if scores is None or scores.size == 0:
            raise InferenceUnavailableError(f"{model} returned no output (server-side numpy >= 2?)")
        return CropOutputs(scores[0])

    def submit(self, model: str, crop: np.ndarray) -> Future[CropOutputs]:
        """Queue one normalised crop [C, 512, 512]; the future gives its CropOutputs."""
        return self._pool.submit(self._infer_one, model, crop)

    def close(self) -> None:
        import tritonclient.utils.shared_memory as shm

        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._regions_lock:
            regions, self._regions = self._regions, []
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        if regions:
            client, _module = self._connect()
            for name, _handle in regions:
                try:
                    client.unregister_system_shared_memory(name)
                except Exception as err:  # Triton gone or restarted: it holds no such region
                    LOGGER.debug("shared memory region %s not unregistered: %s", name, err)
            client.close()
        for _name, handle in regions:
            shm.destroy_shared_memory_region(handle)

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
