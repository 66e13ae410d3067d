"""The Triton model repository: config.pbtxt per model (CPU, Python backend),
configs/openvino.pbtxt (Triton's OpenVINO backend), configs/gpu.pbtxt (TensorRT).

A model's feature list, normalisation constants and version label travel in the
``parameters`` of its config, which the client reads from Triton at run time; installing
a new ONNX file therefore needs no code change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnx

from kappamask.bands import MODEL_NAMES, TILE_SIZE
from kappamask.errors import InvalidInputError
from kappamask.inference.model_spec import (
    AGREEMENT_PARAMETERS,
    ARCHITECTURE_UNET,
    INPUT,
    MIN_INT8_AGREEMENT,
    OFFSET_RULES,
    OFFSET_TRAINING,
    ORIGIN_UNKNOWN,
    OUTPUT_SCORES,
    OUTPUTS,
    PRECISION_AUTO,
    SCORE_CLASSES,
    ModelSpec,
)

LOGGER = logging.getLogger(__name__)

#: The repository shipped with the project (top-level triton_models/).
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[3] / "triton_models"
PYTHON_MODEL_FILE = "cpu_model.py"
FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
CPU_MAX_BATCH = 8
#: Python-backend instances of a CPU model (see _PYTHON_CPU_SERVING).
PYTHON_CPU_INSTANCES = 2
GPU_MAX_BATCH = 16


def _parameters(spec: ModelSpec, agreements: bool = True, **extra: str) -> str:
    params = {
        "level": spec.level,
        "features": ",".join(spec.features),
        "max_v": ",".join(repr(v) for v in spec.max_v),
        "version_label": spec.version_label,
        "origin": spec.origin,
        "architecture": spec.architecture,
        "onnx_sha256": spec.sha256,
        **({"weights_sha256": spec.weights_sha256} if spec.weights_sha256 else {}),
        **({"parent_sha256": spec.parent_sha256} if spec.parent_sha256 else {}),
        "offset_rule": spec.offset_rule,
        **extra,
    }
    # CPU precisions, measured with `kappamask check-precision`; absent until then
    for key, value in zip(AGREEMENT_PARAMETERS, (spec.bf16_agreement, spec.int8_agreement),
                          strict=True):  # fmt: skip
        if agreements and value is not None:
            params[key] = f"{value:.6f}"
    return "\n".join(
        f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
    )


def _io(channels: int, input_type: str = "TYPE_FP16") -> str:
    def dims(name: str) -> str:
        planes = f"{len(SCORE_CLASSES)}, " if name == OUTPUT_SCORES else ""
        return f"[ {planes}{TILE_SIZE}, {TILE_SIZE} ]"

    outputs = ",\n".join(
        f'  {{ name: "{name}" data_type: TYPE_UINT8 dims: {dims(name)} }}' for name in OUTPUTS
    )
    return f"""input [
  {{ name: "{INPUT}" data_type: {input_type} dims: [ {channels}, {TILE_SIZE}, {TILE_SIZE} ] }}
]
output [
{outputs}
]"""


def _serving(
    max_batch: int, preferred: tuple[int, int], delay_us: int, kind: str, instances: int = 1
) -> str:
    """Batch size, dynamic batching and instances: what differs between CPU and GPU."""
    return f"""max_batch_size: {max_batch}
dynamic_batching {{
  preferred_batch_size: [ {preferred[0]}, {preferred[1]} ]
  max_queue_delay_microseconds: {delay_us}
}}
instance_group [ {{ kind: {kind} count: {instances} }} ]"""


#: CPU models: small batches soon (two OpenVINO streams); GPU: larger ones.
_CPU_SERVING = _serving(CPU_MAX_BATCH, (2, 4), 5000, "KIND_CPU")
#: The Python backend runs one batch per instance at a time and idles the cores while a
#: batch's answers and the next batch's crops cross between Triton and its stub process:
#: two instances, each on half the cores (cpu_model.py), take turns (measured on a full
#: product on 2 cores: 112 s end to end against 117 s with one instance). Each instance
#: runs its crops one after another on its one stream, so a larger batch gains nothing and
#: can leave the other instance idle: the client's four requests in flight went to one
#: instance as one batch of 4 whenever the reader was not sending more (at the end of a
#: product: 4 s at 1.4 of 2 cores). Batches of at most 2 keep both instances busy.
PYTHON_CPU_MAX_BATCH = 2
_PYTHON_CPU_SERVING = _serving(PYTHON_CPU_MAX_BATCH, (1, 2), 5000, "KIND_CPU",
                               PYTHON_CPU_INSTANCES)  # fmt: skip
_GPU_SERVING = _serving(GPU_MAX_BATCH, (4, 8), 2000, "KIND_GPU")


def cpu_config(spec: ModelSpec, int8: bool = False) -> str:
    """config.pbtxt of the CPU model: the Python backend (triton_models/cpu_model.py)
    running OpenVINO (ONNX Runtime where OpenVINO is missing) in the fastest precision
    whose classes keep to FP32's on this CPU (model_spec.auto_precision, from the measured
    agreements in the parameters; ``int8``: the version folder holds an INT8 variant)."""
    dims = f"[ {len(spec.features)}, {TILE_SIZE}, {TILE_SIZE} ]"
    params = _parameters(spec, int8_file=INT8_FILE if int8 else "", runtime="openvino",
                         precision=PRECISION_AUTO)  # fmt: skip
    return f"""# Generated by `kappamask install-model`: CPU variant (Python backend: OpenVINO in
# the precision the CPU computes best; ONNX Runtime as the fallback).
name: "{spec.name}"
backend: "python"
{_io(len(spec.features))}
{_PYTHON_CPU_SERVING}
model_warmup [
  {{
    name: "zeros"
    batch_size: 1
    inputs {{ key: "input" value: {{ data_type: TYPE_FP16 dims: {dims} zero_data: true }} }}
  }}
]
{params}
"""


def openvino_config(spec: ModelSpec, int8: bool = False) -> str:
    """configs/openvino.pbtxt: Triton's own OpenVINO backend (the CPU deployments' official
    Triton image; select with ``--model-config-name=openvino``). Throughput mode keeps
    every stream busy. It runs the INT8 variant where the model has one whose measured
    agreement clears ``MIN_INT8_AGREEMENT``, else model.onnx. The backend takes no FP32
    hint: OpenVINO computes floating point in bfloat16 where the CPU has AMX or
    AVX512-BF16, whatever the model's bf16 agreement (the Python-backend config.pbtxt
    honours it). The ONNX input is FP32: the client reads the data type from this config."""
    use_int8 = (
        int8 and spec.int8_agreement is not None and spec.int8_agreement >= MIN_INT8_AGREEMENT
    )
    precision = "int8" if use_int8 else PRECISION_AUTO
    return f"""# Generated by `kappamask install-model`: CPU variant for Triton's OpenVINO backend.
name: "{spec.name}"
backend: "openvino"
default_model_filename: "{INT8_FILE if use_int8 else FP32_FILE}"
{_io(len(spec.features), "TYPE_FP32")}
{_CPU_SERVING}
parameters: {{ key: "PERFORMANCE_HINT" value: {{ string_value: "THROUGHPUT" }} }}
{_parameters(spec, runtime="openvino", precision=precision)}
"""


def gpu_config(spec: ModelSpec) -> str:
    """configs/gpu.pbtxt: the TensorRT FP16 plan built from the same ONNX at deploy time
    (select with ``tritonserver --model-config-name=gpu``)."""
    return f"""# Generated by `kappamask install-model`: GPU variant. model.plan is built on the
# target GPU at deploy time from model.onnx (deploy/), FP16, input binding FP16.
name: "{spec.name}"
platform: "tensorrt_plan"
default_model_filename: "model.plan"
{_io(len(spec.features))}
{_GPU_SERVING}
{_parameters(spec, agreements=False, runtime="tensorrt", precision="fp16")}
"""


def spec_from_onnx(path: Path, level: str | None = None) -> ModelSpec:
    """Read level, features, max_v and version from an exported model's metadata."""
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in ("kappamask.features", "kappamask.max_v") if k not in meta]
    if missing:
        raise InvalidInputError(f"{path} lacks metadata {missing}: export it with kappamask")
    model_level = level or meta.get("kappamask.level", "")
    if model_level not in MODEL_NAMES:
        raise InvalidInputError(f"{path}: unknown level {model_level!r}")
    features = tuple(meta["kappamask.features"].split(","))
    max_v = tuple(float(v) for v in meta["kappamask.max_v"].split(","))
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    if channels != len(features):
        raise InvalidInputError(f"{path}: {channels} input channels but {len(features)} features")
    return ModelSpec(
        MODEL_NAMES[model_level],
        model_level,
        features,
        max_v,
        meta.get("kappamask.version", "unversioned"),
        meta.get("kappamask.origin", ORIGIN_UNKNOWN),
        architecture=meta.get("kappamask.architecture", ARCHITECTURE_UNET),
        weights_sha256=meta.get("kappamask.weights_sha256", ""),
        parent_sha256=meta.get("kappamask.parent_sha256", ""),
        offset_rule=_offset_rule(meta.get("kappamask.offset_rule", OFFSET_TRAINING), path),
    )


def _offset_rule(rule: str, where: object) -> str:
    if rule not in OFFSET_RULES:
        raise InvalidInputError(f"{where}: offset rule {rule!r} is not one of {OFFSET_RULES}")
    return rule


def install_model(
    onnx_path: Path,
    repository: Path = DEFAULT_REPOSITORY,
    level: str | None = None,
    version: int = 1,
    int8_path: Path | None = None,
) -> Path:
    """Place an exported ONNX model in the repository with its CPU and GPU configs.

    ``int8_path`` (an accepted `kappamask quantize` result of the same model) becomes
    what the CPU config runs; the GPU engines are always built from the FP32 file. Without
    it, an INT8 file left from earlier weights is removed.
    """
    spec = spec_from_onnx(onnx_path, level)
    if int8_path is not None:
        int8_spec = spec_from_onnx(int8_path, level)
        if int8_spec != spec:
            raise InvalidInputError(
                f"{int8_path} is {int8_spec.name} {int8_spec.version_label}, not the INT8 "
                f"variant of {spec.name} {spec.version_label}"
            )
    model_dir = repository / spec.name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    for source, name in ((onnx_path, FP32_FILE), (int8_path, INT8_FILE)):
        target = version_dir / name
        if source is None:
            target.unlink(missing_ok=True)
        else:
            _place(source, target)
    # the configs carry the FP32 file's digest: every result names the exact weights
    spec = dataclasses.replace(spec, sha256=sha256_of(version_dir / FP32_FILE))
    link = version_dir / "model.py"
    if not link.exists():  # absent, or left dangling by an older backend file name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(repository / PYTHON_MODEL_FILE, version_dir))
    write_configs(spec, model_dir, int8=int8_path is not None)
    LOGGER.info("installed %s (%s) into %s", spec.name, spec.version_label, model_dir)
    return model_dir


def _place(source: Path, target: Path) -> None:
    """Copy an ONNX file into the repository; one exported before the service had the
    ``cloud_probability`` or ``scores`` outputs gains them on the way (the weights stay as
    they are)."""
    from kappamask.model.onnx_graph import add_missing_outputs

    model = onnx.load(str(source))
    added = add_missing_outputs(model)
    if added:
        LOGGER.info("%s: added the output(s) %s to the graph", source.name, ", ".join(added))
        tmp = target.with_suffix(".partial")
        onnx.save(model, str(tmp))
        os.replace(tmp, target)
    elif source.resolve() != target.resolve():
        shutil.copyfile(source, target)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_configs(spec: ModelSpec, model_dir: Path, int8: bool = False) -> None:
    """Write config.pbtxt, configs/openvino.pbtxt and configs/gpu.pbtxt of ``spec`` into
    ``model_dir`` (``int8``: the version folder holds an accepted INT8 variant)."""
    (model_dir / "configs").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(cpu_config(spec, int8))
    (model_dir / "configs" / "gpu.pbtxt").write_text(gpu_config(spec))
    (model_dir / "configs" / "openvino.pbtxt").write_text(openvino_config(spec, int8))


def config_parameters(config: Path) -> dict[str, str]:
    """The string parameters of a config.pbtxt written here (``_parameters``: one a line);
    empty where there is no config."""
    text = config.read_text() if config.exists() else ""
    return dict(_PARAMETER.findall(text))


_PARAMETER = re.compile(r'parameters: \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}')


def servable_models(repository: Path, names: Sequence[str] | None = None) -> list[str]:
    """Models of the repository that have weights for the CPU backend (an ONNX file)."""
    found = []
    for name in names or sorted(MODEL_NAMES.values()):
        model_dir = repository / name
        if (model_dir / "config.pbtxt").exists() and any(model_dir.glob("[0-9]*/model.onnx")):
            found.append(name)
    return found
