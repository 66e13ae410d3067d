"""Deployment files that cannot run here (no Docker, no GPU), checked by parsing and
validating them: compose, Dockerfiles, Kubernetes manifests, OpenAPI, Triton configs and
the TensorRT engine build."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonpatch
import kubernetes_validate
import onnx
import pytest
import requests
import yaml
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kappamask.cli import main
from kappamask.inference.model_spec import MIN_INT8_AGREEMENT
from kappamask.inference.repository import DEFAULT_REPOSITORY, servable_models
from kappamask.inference.server import LocalTriton, free_port
from kappamask.jobs.queue import QUEUE

from .processes import stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_engines", DEPLOY / "build_engines.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while executing it
    spec.loader.exec_module(module)
    return module


build_engines = _load_script()


# -- docker compose ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _gpu_reserved(service: dict[str, Any]) -> bool:
    devices = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_compose_services_and_ordering(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"triton", "engines", "api", "minio", "createbucket", "postgres", "triton-cpu"} <= set(
        services
    )
    triton, engines, api = services["triton"], services["engines"], services["api"]
    assert re.fullmatch(
        r"\$\{TRITON_IMAGE:-nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3\}", triton["image"]
    )
    assert _gpu_reserved(triton) and _gpu_reserved(engines)
    assert triton["shm_size"] == "1gb"
    assert "./triton_models:/models" in triton["volumes"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert "--model-config-name=gpu" in triton["command"]
    loaded = [a.split("=", 1)[1] for a in triton["command"] if a.startswith("--load-model=")]
    assert loaded == servable_models(DEFAULT_REPOSITORY)  # only models that have weights
    assert triton["depends_on"]["engines"]["condition"] == "service_completed_successfully"
    assert engines["restart"] == "no" and "build_engines.py" in " ".join(engines["command"])
    assert api["depends_on"]["triton"]["condition"] == "service_healthy"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert api["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"
    assert api["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (
        api["environment"]["KAPPAMASK_JOB_MANAGER"] == "kappamask.jobs.managers.PostgreSQLManager"
    )
    assert api["ports"] == ["5000:5000"]
    # the queue: the API enqueues on redis, workers of the same image and settings run jobs
    worker, redis = services["worker"], services["redis"]
    assert worker["image"] == api["image"] and worker["environment"] == api["environment"]
    assert worker["entrypoint"][:2] == ["kappamask", "worker"]
    assert api["environment"]["KAPPAMASK_BROKER_URL"].startswith("redis://redis:6379/")
    for service in (api, worker):
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in redis["command"] and "redis-cli" in redis["healthcheck"]["test"]


def test_compose_fetches_the_official_weights_before_triton(compose: dict[str, Any]) -> None:
    services = compose["services"]
    weights = services["weights"]
    assert set(weights["profiles"]) == {"gpu", "cpu"} and weights["restart"] == "no"
    assert "./triton_models:/models" in weights["volumes"]
    script = " ".join(weights["command"])
    assert (
        'kappamask fetch-weights --level all --architecture "$${KAPPAMASK_WEIGHTS_ARCHITECTURE}" '
        "--repository /models"
    ) in script
    # km_predict's default network unless the operator chooses the paper's
    assert weights["environment"]["KAPPAMASK_WEIGHTS_ARCHITECTURE"] == (
        "${KAPPAMASK_WEIGHTS_ARCHITECTURE:-deeplabv3plus}"
    )
    assert (
        weights["environment"]["KAPPAMASK_OFFICIAL_WEIGHTS"] == "${KAPPAMASK_OFFICIAL_WEIGHTS:-1}"
    )
    for name in ("engines", "triton-cpu"):
        assert services[name]["depends_on"]["weights"] == {
            "condition": "service_completed_successfully"
        }


def test_models_image_fetches_the_official_weights_unless_told_not_to() -> None:
    text = (DEPLOY / "Dockerfile.models").read_text()
    assert re.search(r"^ARG KAPPAMASK_OFFICIAL_WEIGHTS=1$", text, flags=re.M)
    run = text.split("\nRUN ", 1)[1].split("\nFROM ", 1)[0]
    assert 'if [ "$KAPPAMASK_OFFICIAL_WEIGHTS" = "1" ]' in run
    assert "kappamask fetch-weights --level all" in run and "--repository /src/triton_models" in run
    assert re.search(r"^ARG KAPPAMASK_WEIGHTS_ARCHITECTURE=deeplabv3plus$", text, flags=re.M)
    assert '--architecture "$KAPPAMASK_WEIGHTS_ARCHITECTURE"' in run
    final = text.split("\nFROM ")[-1]
    assert "COPY --from=weights /src/triton_models /triton_models" in final


def test_compose_only_the_api_is_published(compose: dict[str, Any]) -> None:
    published = {name for name, svc in compose["services"].items() if svc.get("ports")}
    assert published == {"api"}


def test_compose_cpu_profile(compose: dict[str, Any]) -> None:
    cpu = compose["services"]["triton-cpu"]
    assert cpu["profiles"] == ["cpu"] and not _gpu_reserved(cpu)
    assert "--model-config-name=openvino" in cpu["command"]  # Triton's OpenVINO backend
    assert cpu["image"].startswith("${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:")
    both = {"api", "worker", "redis", "minio", "createbucket", "postgres"}
    assert all(set(compose["services"][s]["profiles"]) == {"gpu", "cpu"} for s in both)


def test_every_compose_variable_without_default_is_in_the_env_example() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    needed = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)\}", text))
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert needed and needed <= set(example)


# -- Dockerfiles ------------------------------------------------------------------------
def test_api_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(stages) == 2 and all("slim" in s for s in stages)
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER kappamask$", final, flags=re.M)
    assert "HEALTHCHECK" in final and "apt-get" not in final and "pip install" not in final
    entry = (DEPLOY / "entrypoint.sh").read_text()
    assert "--worker-class gthread" in entry and "wait-triton" in entry


# -- Kubernetes -------------------------------------------------------------------------
def _render(folder: Path) -> list[dict[str, Any]]:
    """The subset of `kustomize build` these manifests use."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        docs += _render(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text() for f in generator["files"]}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        for i, doc in enumerate(docs):
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]:
                docs[i] = jsonpatch.apply_patch(copy.deepcopy(doc), ops)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
        for labels in kustomization.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
        for image in kustomization.get("images", []):
            for pod in _pod_specs(doc):
                for container in pod.get("containers", []) + pod.get("initContainers", []):
                    if container["image"] == image["name"]:
                        container["image"] = f"{image['newName']}:{image['newTag']}"
    return docs


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc["spec"]["template"]["spec"]] if doc["kind"] == "Deployment" else []


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_kubernetes_overlays_validate_against_the_api_schemas(overlay: str) -> None:
    docs = _render(DEPLOY / "k8s" / "overlays" / overlay)
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # KEDA's custom resource: checked below, not a core API schema
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "kappamask-api"),
        ("Service", "kappamask-api"),
        ("HorizontalPodAutoscaler", "kappamask-api"),
        ("Deployment", "kappamask-triton"),
        ("Service", "kappamask-triton"),
        ("ConfigMap", "pygeoapi-config"),
        ("Secret", "kappamask-credentials"),
    } <= kinds
    for doc in docs:
        for pod in _pod_specs(doc):
            for container in pod["containers"] + pod.get("initContainers", []):
                assert container["resources"]["requests"] and container["resources"]["limits"]
                assert ":" in container["image"], container["image"]
    triton = _find(docs, "Deployment", "kappamask-triton")["spec"]["template"]["spec"]
    assert triton["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    gpu_limit = triton["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    inits = [c["name"] for c in triton["initContainers"]]
    api = _find(docs, "Deployment", "kappamask-api")["spec"]["template"]["spec"]["containers"][0]
    # the API pod is ready only while its Triton is (kappamask.api.guard), alive while it answers
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {e["name"]: e.get("value") for e in api["env"]}["KAPPAMASK_JOB_MANAGER"] == (
        "kappamask.jobs.managers.PostgreSQLManager"
    )
    # the queue: the API enqueues on the Redis the workers read; KEDA scales the workers
    # on the length of the queue's Redis list; both mount the one ReadWriteMany results
    worker_pod = _find(docs, "Deployment", "kappamask-worker")["spec"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    assert worker["command"][:2] == ["kappamask", "worker"]
    broker = {e["name"]: e.get("value") for e in api["env"]}["KAPPAMASK_BROKER_URL"]
    assert {e["name"]: e.get("value") for e in worker["env"]}["KAPPAMASK_BROKER_URL"] == broker
    assert broker.startswith("redis://kappamask-redis:6379/")
    assert ("Service", "kappamask-redis") in kinds
    scaled = _find(docs, "ScaledObject", "kappamask-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "kappamask-worker"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == QUEUE
    assert trigger["metadata"]["address"].startswith("kappamask-redis.")
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    pvc = _find(docs, "PersistentVolumeClaim", "kappamask-results")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    api_pod = _find(docs, "Deployment", "kappamask-api")["spec"]["template"]["spec"]
    for pod in (api_pod, worker_pod):
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["kappamask-results"]
    if overlay == "gpu":
        assert gpu_limit == 1 and inits == ["copy-models", "build-engines"]
        assert "--model-config-name=gpu" in triton["containers"][0]["args"]
    else:
        assert gpu_limit is None and inits == ["copy-models"]
        assert "--model-config-name=gpu" not in triton["containers"][0]["args"]
        assert "--model-config-name=openvino" in triton["containers"][0]["args"]
        assert triton["containers"][0]["image"].startswith("nvcr.io/nvidia/tritonserver:")


def test_the_kubernetes_validator_rejects_a_broken_manifest() -> None:
    docs = _render(DEPLOY / "k8s" / "overlays" / "cpu")
    broken = copy.deepcopy(_find(docs, "Deployment", "kappamask-api"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kubernetes_config_map_is_the_service_config() -> None:
    assert (DEPLOY / "k8s" / "base" / "pygeoapi-config.yml").read_text() == (
        ROOT / "pygeoapi-config.yml"
    ).read_text()


# -- pygeoapi OpenAPI -------------------------------------------------------------------
def test_pygeoapi_config_generates_a_valid_openapi_document(tmp_path: Path) -> None:
    """`kappamask openapi` fills the configuration in from the settings, as the service
    does, and pygeoapi's own validator takes the document."""
    pygeoapi = Path(sys.executable).with_name("pygeoapi")
    out = tmp_path / "openapi.yml"
    arguments = ["openapi", str(ROOT / "pygeoapi-config.yml"), "--output-file", str(out)]
    done = CliRunner().invoke(main, arguments)
    assert done.exit_code == 0, done.output
    done = subprocess.run(
        [pygeoapi, "openapi", "validate", out], capture_output=True, text=True, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Valid OpenAPI document" in done.stdout, output
    assert "/processes/kappamask/execution" in out.read_text()


# -- Triton configs and TensorRT engines ------------------------------------------------
def _config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("model", ["kappamask_l1c", "kappamask_l2a"])
def test_triton_configs_parse_and_agree(model: str) -> None:
    cpu = _config(DEFAULT_REPOSITORY / model / "config.pbtxt")
    gpu = _config(DEFAULT_REPOSITORY / model / "configs" / "gpu.pbtxt")
    ov = _config(DEFAULT_REPOSITORY / model / "configs" / "openvino.pbtxt")
    assert cpu.name == gpu.name == ov.name == model
    assert cpu.backend == "python" and gpu.platform == "tensorrt_plan" and ov.backend == "openvino"
    # Triton's OpenVINO backend runs the ONNX file as it is (FP32 input; the client reads
    # the data type from the config), in throughput mode: the INT8 variant where its
    # measured agreement clears the bar, else model.onnx
    int8 = ov.parameters["int8_agreement"].string_value
    accepted = bool(int8) and float(int8) >= MIN_INT8_AGREEMENT
    assert ov.default_model_filename == ("model.int8.onnx" if accepted else "model.onnx")
    assert ov.parameters["precision"].string_value == ("int8" if accepted else "auto")
    assert (DEFAULT_REPOSITORY / model / "1" / ov.default_model_filename).is_file()
    assert [(i.name, i.data_type) for i in ov.input] == [("input", model_config_pb2.TYPE_FP32)]
    assert ov.parameters["PERFORMANCE_HINT"].string_value == "THROUGHPUT"
    assert cpu.parameters["runtime"].string_value == ov.parameters["runtime"].string_value
    for cfg in (cpu, gpu, ov):
        if cfg is not ov:
            assert [(i.name, i.data_type) for i in cfg.input] == [
                ("input", model_config_pb2.TYPE_FP16)
            ]
        assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
            ("classes", model_config_pb2.TYPE_UINT8, [512, 512]),
            ("confidence", model_config_pb2.TYPE_UINT8, [512, 512]),
            ("cloud_probability", model_config_pb2.TYPE_UINT8, [512, 512]),
            ("scores", model_config_pb2.TYPE_UINT8, [4, 512, 512]),
        ]
    assert list(cpu.input[0].dims) == list(gpu.input[0].dims) == list(ov.input[0].dims)
    for key in ("features", "max_v", "version_label", "onnx_sha256"):
        assert cpu.parameters[key].string_value == gpu.parameters[key].string_value
        assert cpu.parameters[key].string_value == ov.parameters[key].string_value
    assert gpu.max_batch_size == build_engines.BuildOptions().max_batch
    for onnx_path in (DEFAULT_REPOSITORY / model).glob("[0-9]*/model.onnx"):
        graph = onnx.load(str(onnx_path)).graph
        assert [i.name for i in graph.input] == ["input"]
        assert graph.input[0].type.tensor_type.shape.dim[1].dim_value == cpu.input[0].dims[0]
        assert [o.name for o in graph.output] == [o.name for o in cpu.output]
        assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.UINT8] * 4


def test_engine_build_checks_and_exact_trtexec_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_files = sorted(DEFAULT_REPOSITORY.glob("*/[0-9]*/model.onnx"))
    assert onnx_files
    for path in onnx_files:
        channels = build_engines.check_onnx(path)
        assert channels == 13
        command = build_engines.trtexec_command(
            "trtexec", path, path.with_name("model.plan"), channels, build_engines.BuildOptions()
        )
        assert command == [
            "trtexec",
            f"--onnx={path}",
            f"--saveEngine={path.with_name('model.plan')}",
            "--fp16",
            "--inputIOFormats=fp16:chw",
            "--minShapes=input:1x13x512x512",
            "--optShapes=input:8x13x512x512",
            "--maxShapes=input:16x13x512x512",
            "--memPoolSize=workspace:4096",
            "--skipInference",
        ]
    # dry run over a copy of the repository: prints the commands, builds nothing
    repo = tmp_path / "repo"
    target = repo / "kappamask_l2a" / "1"
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(
        (DEFAULT_REPOSITORY / "kappamask_l2a" / "1" / "model.onnx").read_bytes()
    )
    assert build_engines.main(["--repository", str(repo), "--dry-run", "--trtexec", "trtexec"]) == 0
    assert "--saveEngine=" in capsys.readouterr().out and not (target / "model.plan").exists()
    # a plan with a matching stamp is current and skipped
    options = build_engines.BuildOptions()
    (target / "model.plan").write_bytes(b"plan")
    (target / "model.plan.stamp").write_text(
        build_engines.stamp_for(
            target / "model.onnx", build_engines.environment_id("trtexec"), options
        )
    )
    assert build_engines.build(repo, None, "trtexec", options, dry_run=False) == 0
    assert "plan is current, skipped" in capsys.readouterr().out


def test_engine_build_refuses_a_fixed_batch_axis(tmp_path: Path) -> None:
    model = onnx.load(str(DEFAULT_REPOSITORY / "kappamask_l2a" / "1" / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    with pytest.raises(SystemExit, match="dynamic batch"):
        build_engines.check_onnx(path)


# -- the API container's entry point ----------------------------------------------------
@pytest.mark.slow
def test_api_entry_point_serves_behind_the_guard(triton: LocalTriton, tmp_path: Path) -> None:
    """deploy/entrypoint.sh as the API container runs it (wait for Triton, OpenAPI
    document, gunicorn kappamask.api.wsgi:app): health endpoints, JSON 4xx for bad bodies."""
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "KAPPAMASK_PYGEOAPI_CONFIG": str(ROOT / "pygeoapi-config.yml"),
        "KAPPAMASK_TRITON_URL": triton.http_url,
        "KAPPAMASK_PORT": str(port),
        "KAPPAMASK_JOBS_DB": str(tmp_path / "jobs.db"),
        "KAPPAMASK_JOB_OUTPUT_DIR": str(tmp_path / "jobs"),
        "KAPPAMASK_OUTPUT_DIR": str(tmp_path / "out"),
        "GUNICORN_WORKERS": "1",
    }
    (tmp_path / "jobs").mkdir()
    log = tmp_path / "api.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["sh", str(DEPLOY / "entrypoint.sh")], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, proc, log)
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert requests.get(f"{url}/health/ready", timeout=10).status_code == 200
        bad = requests.post(
            f"{url}/processes/kappamask/execution",
            data="[1, 2, 3]",
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert bad.status_code == 400 and "must be a JSON object" in bad.json()["description"]
        # the OpenAPI document it serves needs no schema server (air-gapped deployments)
        openapi = requests.get(f"{url}/openapi", params={"f": "json"}, timeout=10)
        assert openapi.status_code == 200 and "/processes/kappamask/execution" in openapi.text
        assert "schemas.opengis.net" not in openapi.text
    finally:
        stop(proc, signal.SIGTERM)
