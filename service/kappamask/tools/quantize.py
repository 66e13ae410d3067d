"""INT8 variant of a served model for CPU hosts: static QDQ quantisation calibrated on
real crops, accepted only when its classes agree with the FP32 model.

On CPUs with AVX512-VNNI (or AVX-VNNI) ONNX Runtime runs 8-bit convolutions several
times faster than FP32, and the FP32 model is already at the machine's FP32 peak, so
this is where CPU time per crop can still come down. Some layers must stay FP32: the
first convolution (raw features, very different ranges per band) and the output side.
The paper's head squeezes everything through a 3x3 convolution to two channels before
the 1x1 class layer, so one activation with a range of thousands carries the decision;
8 bits there flip a third of the pixels (measured on the bootstrap L2A model). The
quantiser therefore walks a ladder of FP32 layer sets, from the output backwards, and
keeps the first variant whose classes agree with FP32 on held-out real crops. The
TensorRT engines keep being built from the FP32 file.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from rasterio.windows import Window

from kappamask.errors import InvalidInputError
from kappamask.geometry.grid import output_grid
from kappamask.geometry.tiling import CropGrid, block_of, cut, has_data, with_context
from kappamask.inference.model_spec import ARCHITECTURE_DEEPLAB, OUTPUT_CLASSES
from kappamask.inference.model_spec import INPUT as INPUT_NAME
from kappamask.reading.reader import BandReader
from kappamask.sources.safe import open_safe
from kappamask.tools.composites import compose

LOGGER = logging.getLogger(__name__)

#: The paper's acceptance rule for a faster model: classes equal on this share of pixels.
MIN_AGREEMENT = 0.995
#: Convolutions kept in FP32 (prefixes of their weight names, see onnx_graph.build_model),
#: tried in this order; every step keeps more of the full-resolution decoder in FP32.
FP32_LADDER = (
    ("enc1.conv1.", "head."),
    ("enc1.conv1.", "head.", "dec1."),
    ("enc1.conv1.", "head.", "dec1.", "up1."),
    ("enc1.conv1.", "head.", "dec1.", "up1.", "dec2."),
)
#: The same for km_predict's DeepLabv3+ (kappamask.model.deeplab.layer_names): its first
#: convolution and the softmax's, then the decoder at output stride 4, then ASPP.
DEEPLAB_FP32_LADDER = (
    ("entry1.", "head."),
    ("entry1.", "head.", "decoder"),
    ("entry1.", "head.", "decoder", "aspp"),
)
#: Concat stays FP32: its output feeds the FP32 decoder at full resolution.
QUANTIZED_OPS = ["Conv", "MaxPool", "Resize"]


@dataclass(frozen=True)
class QuantizeReport:
    """How the INT8 model compares with the FP32 one on held-out real crops."""

    calibration_crops: int
    check_crops: int
    fp32_layers: tuple[str, ...]
    pixels: int
    agreement: float
    fp32_s_per_crop: float
    int8_s_per_crop: float

    @property
    def accepted(self) -> bool:
        return self.agreement >= MIN_AGREEMENT

    def to_json(self) -> dict[str, float | int | bool | str]:
        return {
            "calibration_crops": self.calibration_crops,
            "check_crops": self.check_crops,
            "fp32_layers": ",".join(self.fp32_layers),
            "pixels": self.pixels,
            "agreement": self.agreement,
            "fp32_s_per_crop": self.fp32_s_per_crop,
            "int8_s_per_crop": self.int8_s_per_crop,
            "speed_up": self.fp32_s_per_crop / self.int8_s_per_crop,
            "accepted": self.accepted,
        }


def real_crops(
    products: Sequence[str | Path],
    features: Sequence[str],
    max_v: Sequence[float],
    resolution: int,
) -> Iterator[np.ndarray]:
    """Every crop of the products' crop grids that has a valid pixel, as the service
    would send it (normalised float32 [C, 512, 512], mirrored past the raster's edges)."""
    for path in products:
        product = open_safe(path)
        grid = output_grid(product, resolution)
        crops = CropGrid(grid.height, grid.width)
        with BandReader(product, features, max_v, grid) as reader:
            for row in range(len(crops.rows)):
                row_crops = crops.row_crops(row)
                block = block_of(crops, row_crops)
                strip, valid = reader.read(
                    Window(
                        block.left, block.top, block.right - block.left, block.bottom - block.top
                    )
                )
                extended = with_context(strip, block, row_crops)
                for crop in row_crops:
                    if has_data(valid, block, crop):
                        yield cut(extended, crop, row_crops)


def _session(path: Path, threads: int = 0) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _named(model: onnx.ModelProto, fp32_layers: Sequence[str]) -> list[str]:
    """Give every node a name (the quantiser excludes nodes by name); return the names
    of the convolutions that stay FP32."""
    keep = []
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type.lower()}_{i}"
        if node.op_type == "Conv" and node.input[1].startswith(tuple(fp32_layers)):
            keep.append(node.name)
    if not keep:
        raise InvalidInputError(
            "not a KappaMask graph (no convolution named as expected): export or import it "
            "with kappamask"
        )
    return keep


def quantize(
    fp32_path: Path,
    out_path: Path,
    calibration: Sequence[np.ndarray],
    fp32_layers: Sequence[str] = FP32_LADDER[0],
) -> Path:
    """Write the QDQ INT8 model of ``fp32_path`` calibrated on ``calibration`` crops,
    with the convolutions named by ``fp32_layers`` left in FP32."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._crops = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            crop = next(self._crops, None)
            return None if crop is None else {INPUT_NAME: crop[None].astype(np.float32)}

    if not calibration:
        raise InvalidInputError("no calibration crop with valid pixels")
    model = onnx.load(str(fp32_path))
    keep = _named(model, fp32_layers)
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(named),
            str(staged),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=keep,
            calibrate_method=CalibrationMethod.MinMax,
        )
        int8 = onnx.load(str(staged))
    del int8.metadata_props[:]
    for prop in model.metadata_props:
        entry = int8.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    entry = int8.metadata_props.add()
    entry.key, entry.value = "kappamask.precision", "int8"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(int8, str(out_path))
    return out_path


def _seconds_per_crop(session: object, crops: Sequence[np.ndarray], repeats: int) -> float:
    run = session.run  # type: ignore[attr-defined]
    run([OUTPUT_CLASSES], {INPUT_NAME: crops[0][None]})  # warm-up: allocations, kernels
    started = time.perf_counter()
    for i in range(repeats):
        run([OUTPUT_CLASSES], {INPUT_NAME: crops[i % len(crops)][None]})
    return (time.perf_counter() - started) / repeats


def _classes(session: object, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
    run = session.run  # type: ignore[attr-defined]
    return [run([OUTPUT_CLASSES], {INPUT_NAME: c[None].astype(np.float32)})[0][0] for c in crops]


def _agreement(
    reference: Sequence[np.ndarray], other: Sequence[np.ndarray], crops: Sequence[np.ndarray]
) -> tuple[int, float]:
    """Pixels with data in ``crops`` and the share of them where the classes are equal."""
    equal = total = 0
    for a, b, crop in zip(reference, other, crops, strict=True):
        has_data = np.abs(crop).max(axis=0) > 0
        equal += int((a == b)[has_data].sum())
        total += int(has_data.sum())
    if total == 0:
        raise InvalidInputError("no check crop with valid pixels")
    return total, equal / total


def compare(
    fp32_path: Path, int8_path: Path, crops: Sequence[np.ndarray], timing_repeats: int = 4
) -> tuple[int, float, float, float]:
    """Pixels compared, share with equal classes (pixels with data only), and seconds
    per crop of both models."""
    fp32, int8 = _session(fp32_path), _session(int8_path)
    pixels, share = _agreement(_classes(fp32, crops), _classes(int8, crops), crops)
    return (
        pixels,
        share,
        _seconds_per_crop(fp32, crops, timing_repeats),
        _seconds_per_crop(int8, crops, timing_repeats),
    )


def quantize_and_check(
    fp32_path: Path,
    out_path: Path,
    products: Sequence[str | Path],
    resolution: int,
    features: Sequence[str],
    max_v: Sequence[float],
    max_crops: int = 32,
    timing_repeats: int = 4,
    composites: bool = True,
    seed: int = 0,
) -> QuantizeReport:
    """Calibrate on every other crop, check on the rest, walking FP32_LADDER until
    the agreement reaches MIN_AGREEMENT; ``out_path`` is written only then (the report
    of the last variant tried says either way). The crops are the products' real crops
    and, with ``composites``, the same crops under synthetic clouds."""
    crops = []
    for crop in real_crops(products, features, max_v, resolution):
        crops.append(crop)
        if len(crops) >= max_crops:
            break
    if len(crops) < 2:
        raise InvalidInputError("need at least two crops with valid pixels")
    if composites:
        # a clear product alone would check only the easy case: add each crop once more
        # with synthetic clouds, cirrus and shadows drawn over it
        rng = np.random.default_rng(seed)
        crops += [compose(c, np.abs(c).max(axis=0) > 0, features, max_v, rng)[0] for c in crops]
    calibration, check = crops[0::2], crops[1::2]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # the FP32 side of every comparison is the same: run and time it once
    fp32 = _session(fp32_path)
    reference = _classes(fp32, check)
    t32 = _seconds_per_crop(fp32, check, timing_repeats)
    report = None
    meta = {
        p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props
    }
    deeplab = meta.get("kappamask.architecture") == ARCHITECTURE_DEEPLAB
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        for fp32_layers in DEEPLAB_FP32_LADDER if deeplab else FP32_LADDER:
            staged = quantize(fp32_path, Path(tmp) / out_path.name, calibration, fp32_layers)
            int8 = _session(staged)
            pixels, agreement = _agreement(reference, _classes(int8, check), check)
            t8 = _seconds_per_crop(int8, check, timing_repeats)
            report = QuantizeReport(
                len(calibration), len(check), tuple(fp32_layers), pixels, agreement, t32, t8
            )
            LOGGER.info(
                "INT8 with %s in FP32: agreement %.4f, %.3f s -> %.3f s per crop",
                ",".join(fp32_layers),
                agreement,
                t32,
                t8,
            )
            if report.accepted:
                staged.replace(out_path)
                break
    assert report is not None
    return report
