"""How closely a served model's classes keep to FP32 in bfloat16 and in its INT8 variant,
measured on real crops and written into the model's configs (`kappamask check-precision`).

Reduced precision is a property of the weights, not only of the CPU: a model whose
classes hinge on near ties between its sigmoid outputs flips pixels in bfloat16 that a
confident one keeps. Measured on the bootstrap models, OpenVINO 2026.4 on AMX: the L1C
model keeps 99.93 % of the pixels of the 144 real SEN12MS-CR patches in bfloat16 and
99.84 % in INT8; the L2A model 99.93 % and 99.81 % of the whole real T29UNU product (60 m,
heavy cloud, cirrus and shadow) and a real desert tile, 99.89 % and 99.67 % of the 144
patches as pseudo-L2A (the margin of bfloat16 is thin there). On inputs unlike any real scene
the reduced precisions drift further (the T22HBD fixture, every band upsampled 18x from
100 px: 99.4 % and 95 %), so measure on real scenes. ``auto`` (model_spec.auto_precision)
reads the agreements back: the fastest precision that keeps at least 99.9 % (bfloat16) or
99.5 % (INT8) of the pixels runs.

The crops run as the CPU model runs them (cpu_model.py): OpenVINO, FP16 input, bfloat16
on ``model.onnx``, the INT8 file with its kept layers in FP32. Agreement is the share of
pixels with data whose class equals the FP32 model's, over all crops together.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kappamask.bands import TILE_SIZE
from kappamask.errors import InvalidInputError
from kappamask.inference.model_spec import ModelSpec, parse_agreements
from kappamask.inference.repository import (
    FP32_FILE,
    INT8_FILE,
    config_parameters,
    sha256_of,
    spec_from_onnx,
    write_configs,
)
from kappamask.tools import realdata

LOGGER = logging.getLogger(__name__)

#: Precision -> (file, OpenVINO inference precision hint), as cpu_model.choose serves it.
SERVED = {"f32": (FP32_FILE, "f32"), "bf16": (FP32_FILE, "bf16"), "int8": (INT8_FILE, "f32")}


@dataclass(frozen=True)
class PrecisionReport:
    """Agreements with FP32 (None: not measurable here) and seconds per crop."""

    model: str
    crops: int
    pixels: int
    bf16_agreement: float | None
    int8_agreement: float | None
    seconds_per_crop: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_version_dir(model_dir: Path) -> Path:
    """The newest version folder of an installed model (the one with a model.onnx)."""
    versions = sorted(
        (p for p in model_dir.glob("[0-9]*") if (p / FP32_FILE).exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else -1,
    )
    if not versions:
        raise InvalidInputError(f"{model_dir} holds no installed model ({FP32_FILE})")
    return versions[-1]


def _imagery(path: Path, level: str, resolution: int) -> Iterator[realdata.Imagery]:
    """Real scenes at ``path``: a SAFE product, a folder of band files, a 13-band GeoTIFF
    patch or a folder of them."""
    if path.suffix.upper() == ".SAFE" or (path / "manifest.safe").exists():
        yield realdata.read_safe(path, resolution)
    elif path.is_file():
        yield realdata.read_multiband(path)
    elif any(path.glob("*.jp2")) or any(path.glob("B0*.tif")):
        yield realdata.read_band_folder(path, level)
    else:
        patches = sorted(path.rglob("*.tif"))
        if not patches:
            raise InvalidInputError(f"{path} holds no product, band files or GeoTIFF patches")
        for patch in patches:
            yield realdata.read_multiband(patch)


def crops(
    paths: Sequence[Path], spec: ModelSpec, resolution: int, pseudo_l2a: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features [C, 512, 512] as the client sends them, data mask) of every 512 px block
    of the scenes at ``paths``; a scene smaller than a crop is mirrored to fill it and only
    its own pixels count. ``pseudo_l2a``: L1C scenes go to an L2A model as distillation
    trains on them (``realdata.pseudo_l2a``, drawn from a fixed seed): the real L2A
    products here are few, the L1C patches many and varied."""
    rng = np.random.default_rng(0)
    for path in paths:
        for img in _imagery(path, spec.level, resolution):
            if pseudo_l2a and img.level == "L1C" and spec.level == "L2A":
                img = realdata.pseudo_l2a(img, rng)
            if img.level != spec.level:
                raise InvalidInputError(f"{img.name} is {img.level}; {spec.name} is {spec.level}")
            feats = realdata.features(img, spec.level, spec.features, spec.max_v)
            # the client sends float16 (reader.normalise): measure on what Triton receives
            feats = feats.astype(np.float16).astype(np.float32)
            h, w = img.shape
            for y in range(0, h, TILE_SIZE):
                for x in range(0, w, TILE_SIZE):
                    part = feats[:, y : y + TILE_SIZE, x : x + TILE_SIZE]
                    valid = img.valid[y : y + TILE_SIZE, x : x + TILE_SIZE]
                    if not valid.any():
                        continue
                    pad = ((0, TILE_SIZE - valid.shape[0]), (0, TILE_SIZE - valid.shape[1]))
                    part = np.pad(part, ((0, 0), *pad), mode="reflect")
                    yield part, np.pad(valid, pad)


def _compiled(version_dir: Path, precision: str, channels: int) -> Callable[[np.ndarray], Any]:
    import openvino as ov

    name, hint = SERVED[precision]
    core = ov.Core()
    model = core.read_model(str(version_dir / name))
    model.reshape([1, channels, TILE_SIZE, TILE_SIZE])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    classes = compiled.output("classes")
    return lambda x: compiled({0: x[None]})[classes][0]


def measure(
    model_dir: Path,
    paths: Sequence[Path],
    resolution: int = 60,
    progress: Callable[[int], None] | None = None,
    pseudo_l2a: bool = False,
) -> PrecisionReport:
    """Classes of every crop of ``paths`` in FP32, bfloat16 (where this CPU computes it:
    elsewhere OpenVINO would silently run FP32 and the agreement would mean nothing) and
    the INT8 variant (where the model has one); their agreements with FP32."""
    import openvino as ov

    version_dir = model_version_dir(model_dir)
    spec = spec_from_onnx(version_dir / FP32_FILE)
    precisions = ["f32"]
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        precisions.append("bf16")
    else:
        LOGGER.warning("this CPU has no native bfloat16: bf16 agreement not measured")
    if (version_dir / INT8_FILE).exists():
        precisions.append("int8")
    models = {p: _compiled(version_dir, p, len(spec.features)) for p in precisions}
    equal = dict.fromkeys(precisions, 0)
    seconds = dict.fromkeys(precisions, 0.0)
    pixels = count = 0
    for feats, valid in crops(paths, spec, resolution, pseudo_l2a):
        classes = {}
        for p, run in models.items():
            t0 = time.perf_counter()
            classes[p] = run(feats)
            seconds[p] += time.perf_counter() - t0
        reference = classes["f32"][valid]
        for p in precisions:
            equal[p] += int((classes[p][valid] == reference).sum())
        pixels += int(valid.sum())
        count += 1
        if progress is not None:
            progress(count)
    if not pixels:
        raise InvalidInputError("no pixel with data in the given scenes")

    def share(p: str) -> float | None:
        return equal[p] / pixels if p in equal else None

    return PrecisionReport(
        spec.name,
        count,
        pixels,
        share("bf16"),
        share("int8"),
        {p: s / count for p, s in seconds.items()},
    )


def record(model_dir: Path, report: PrecisionReport) -> ModelSpec:
    """Write the report's agreements into the model's configs (what ``auto`` reads); an
    agreement not measured keeps what the config said."""
    version_dir = model_version_dir(model_dir)
    spec = spec_from_onnx(version_dir / FP32_FILE)
    params = config_parameters(model_dir / "config.pbtxt")
    bf16, int8 = parse_agreements(params)
    spec = dataclasses.replace(
        spec,
        sha256=sha256_of(version_dir / FP32_FILE),
        bf16_agreement=report.bf16_agreement if report.bf16_agreement is not None else bf16,
        int8_agreement=report.int8_agreement if report.int8_agreement is not None else int8,
    )
    write_configs(spec, model_dir, int8=(version_dir / INT8_FILE).exists())
    return spec
