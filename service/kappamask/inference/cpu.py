"""What the CPU of this host computes fastest: the runtime and precision of CPU models.

The CPU model (triton_models/cpu_model.py) runs OpenVINO in bfloat16 where the CPU
computes it natively (Intel AMX or AVX512-BF16: OpenVINO's BF16 capability), else the
model's accepted INT8 variant, else FP32; ONNX Runtime where the openvino package is
missing. `kappamask serve` and `kappamask run` judge the host the same way for the Triton
they start, log it, and keep it in ``HOST_RUNTIME_ENV`` / ``HOST_PRECISION_ENV`` so that
every result of this process records how its mask was computed (``resolve``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOGGER = logging.getLogger(__name__)

#: Set by the process that starts a local Triton: the runtime of its CPU models and the
#: precision they run model.onnx in on this CPU (bf16 or f32).
HOST_RUNTIME_ENV = "KAPPAMASK_HOST_RUNTIME"
HOST_PRECISION_ENV = "KAPPAMASK_HOST_PRECISION"
#: Force a runtime (openvino, onnxruntime) or a precision (bf16, f32, int8) of the CPU
#: models of a local Triton: read by cpu_model.py in Triton's environment, and here.
CPU_RUNTIME_ENV = "KAPPAMASK_CPU_RUNTIME"
CPU_PRECISION_ENV = "KAPPAMASK_CPU_PRECISION"
#: CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def host_runtime() -> tuple[str, str]:
    """(runtime, precision) the CPU model will run with on this host, as it decides:
    OpenVINO in bf16 or f32, or ONNX Runtime when the openvino package is missing."""
    forced = os.environ.get(CPU_RUNTIME_ENV)
    if forced == "onnxruntime":
        return "onnxruntime", "f32"
    try:
        import openvino as ov
    except ImportError:
        return "onnxruntime", "f32"
    requested = os.environ.get(CPU_PRECISION_ENV, "auto")
    if requested != "auto":
        return "openvino", requested
    try:
        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no CPU plugin: judge by the flags
        capabilities = ["BF16"] if _cpu_flags() & set(BF16_FLAGS) else []
    return "openvino", "bf16" if "BF16" in capabilities else "f32"


def announce_host_runtime() -> str:
    """Log what the local Triton's CPU models run with and record it for this process's
    results; the description."""
    runtime, precision = host_runtime()
    flags = sorted(_cpu_flags() & set(BF16_FLAGS)) or ["no native bfloat16"]
    LOGGER.info("CPU models run with %s; model.onnx in %s (%s)", runtime, precision,
                ", ".join(flags))  # fmt: skip
    os.environ[HOST_RUNTIME_ENV] = runtime
    os.environ[HOST_PRECISION_ENV] = precision
    return f"{runtime}, {precision}"


def resolve(runtime: str, precision: str, has_int8: bool) -> tuple[str, str]:
    """(runtime, precision) a CPU model declared with ``precision`` auto runs with on the
    local Triton this process started (as cpu_model.py decides); unchanged where this
    process started none, or for a precision the config fixes."""
    host_precision = os.environ.get(HOST_PRECISION_ENV)
    if precision != "auto" or host_precision is None:
        return runtime, precision
    runtime = os.environ.get(HOST_RUNTIME_ENV, runtime)
    forced = os.environ.get(CPU_PRECISION_ENV, "auto")
    if forced != "auto":
        return runtime, forced
    if runtime == "openvino" and host_precision == "bf16":
        return runtime, "bf16"
    return runtime, "int8" if has_int8 else "f32"
