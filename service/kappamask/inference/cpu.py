"""What the CPU of this host computes fastest: the runtime and precision of CPU models.

The CPU model (triton_models/cpu_model.py) runs OpenVINO in the fastest precision whose
classes keep to FP32's (``model_spec.auto_precision``): the INT8 variant where its measured
agreement allows, else bfloat16 where the CPU computes it natively (Intel AMX or
AVX512-BF16: OpenVINO's BF16 capability) and the model's agreement allows, else FP32;
ONNX Runtime where the openvino package is missing. `kappamask serve` and `kappamask run`
judge the host the same way for the Triton they start, log it, and remember it so that
every result of this process records how its mask was computed (``resolve``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kappamask import settings
from kappamask.inference.model_spec import PRECISION_AUTO, auto_precision

LOGGER = logging.getLogger(__name__)

#: Set once this process has started a local Triton: the runtime of its CPU models, the
#: floating-point precision this CPU computes natively (bf16 or f32) or the one the
#: settings forced, and whether they forced it.
_HOST: tuple[str, str, bool] | None = None
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


def host_runtime(config: settings.Settings | None = None) -> tuple[str, str]:
    """(runtime, precision) of CPU models on this host before each model's agreements
    are weighed: OpenVINO in bf16 (native bfloat16) or f32, or ONNX Runtime when the
    openvino package is missing; what ``config`` (this process's settings) forces."""
    config = config or settings.current()
    if config.cpu_runtime == "onnxruntime":
        return "onnxruntime", "f32"
    try:
        import openvino as ov
    except ImportError:
        return "onnxruntime", "f32"
    if config.cpu_precision != PRECISION_AUTO:
        return "openvino", config.cpu_precision
    try:
        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no CPU plugin: judge by the flags
        capabilities = ["BF16"] if _cpu_flags() & set(BF16_FLAGS) else []
    return "openvino", "bf16" if "BF16" in capabilities else "f32"


def announce_host_runtime(config: settings.Settings) -> str:
    """Log what the local Triton started with ``config`` runs its CPU models with and
    record it for this process's results; the description."""
    runtime, precision = host_runtime(config)
    flags = sorted(_cpu_flags() & set(BF16_FLAGS)) or ["no native bfloat16"]
    LOGGER.info(
        "CPU models run with %s; floating point in %s (%s), INT8 variants where "
        "their measured agreement allows",
        runtime,
        precision,
        ", ".join(flags),
    )
    global _HOST
    _HOST = runtime, precision, config.cpu_precision != PRECISION_AUTO
    return f"{runtime}, {precision}"


def resolve(
    runtime: str,
    precision: str,
    has_int8: bool,
    bf16_agreement: float | None = None,
    int8_agreement: float | None = None,
) -> tuple[str, str]:
    """(runtime, precision) a CPU model declared with ``precision`` auto runs with on the
    local Triton this process started (as cpu_model.py decides, from the host's bfloat16
    and the model's measured agreements); unchanged where this process started none, or
    for a precision the config fixes."""
    if precision != PRECISION_AUTO or _HOST is None:
        return runtime, precision
    runtime, host_precision, forced = _HOST
    if forced:
        return runtime, host_precision
    cpu_has_bf16 = runtime == "openvino" and host_precision == "bf16"
    return runtime, auto_precision(cpu_has_bf16, has_int8, bf16_agreement, int8_agreement)
