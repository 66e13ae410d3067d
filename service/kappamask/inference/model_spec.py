"""What a model declares about itself: the one description shared by the repository
(which writes it into config.pbtxt) and the client (which reads it back from Triton)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kappamask.bands import MaskClass

#: Where a model's weights come from, as every result states it.
ORIGIN_OFFICIAL = "official"  # KappaZeta's published weights (kappamask fetch-weights)
ORIGIN_BOOTSTRAP = "bootstrap"  # this project's own (kappamask distill / train)
ORIGIN_IMPORTED = "keras-import"  # a Keras file a user converted (kappamask import-keras)
ORIGIN_FINE_TUNED = "fine-tuned"  # a served model fine-tuned on people's labels (issue 31)
ORIGIN_UNKNOWN = "unknown"  # a model installed before origins were recorded
#: The architectures a served model may have (recorded as ``kappamask.architecture``).
ARCHITECTURE_UNET = "unet"
ARCHITECTURE_DEEPLAB = "deeplabv3plus"
ARCHITECTURES = (ARCHITECTURE_UNET, ARCHITECTURE_DEEPLAB)
#: How a model's inputs meet the radiometric offset of products from baseline 04.00 on
#: (RADIO_ADD_OFFSET, BOA_ADD_OFFSET: -1000 DN). ``training``: the offset is added to the
#: DN, which puts every baseline on the scale the weights were trained on (the paper's
#: training products predate 04.00). ``km_predict``: as KappaZeta's km_predict v2.4 does
#: it, the L1C offset also shifts the divisor (max_v + offset / 65535) and L2A products get
#: no offset at all (km_predict reads only L1C's Radiometric_Offset_List).
OFFSET_TRAINING = "training"
OFFSET_KM_PREDICT = "km_predict"
OFFSET_RULES = (OFFSET_TRAINING, OFFSET_KM_PREDICT)
#: A CPU config's precision: decided where the model runs, by what its CPU computes and
#: how closely the model's classes keep to FP32 in each reduced precision (``auto_precision``).
PRECISION_AUTO = "auto"
#: Share of real pixels with data whose class must equal the FP32 model's for ``auto`` to
#: run a model in bfloat16, and in INT8 (the quantiser's acceptance rule).
MIN_BF16_AGREEMENT = 0.999
MIN_INT8_AGREEMENT = 0.995
#: Config parameters of the measured agreements (ModelSpec.bf16_agreement, int8_agreement).
AGREEMENT_PARAMETERS = ("bf16_agreement", "int8_agreement")

#: The tensors of every served model, on every backend: normalised features in; per pixel
#: the mask code, the winning sigmoid x 255, the cloud probability in percent (255 where
#: the input has no data) and the four classes' scores x 255 (see
#: kappamask.model.onnx_graph). The service asks for the scores only: it blends
#: overlapping crops and decides the classes itself (kappamask.geometry.tiling); the other three
#: are there for clients that call Triton directly.
INPUT = "input"
OUTPUT_CLASSES = "classes"
OUTPUT_CONFIDENCE = "confidence"
OUTPUT_PROBABILITY = "cloud_probability"
OUTPUT_SCORES = "scores"
OUTPUTS = (OUTPUT_CLASSES, OUTPUT_CONFIDENCE, OUTPUT_PROBABILITY, OUTPUT_SCORES)
#: The classes of ``scores``, in order (the network's outputs a pixel with data may take).
SCORE_CLASSES = (
    MaskClass.CLEAR,
    MaskClass.CLOUD_SHADOW,
    MaskClass.SEMI_TRANSPARENT_CLOUD,
    MaskClass.CLOUD,
)
#: The probability's value where the input has no data.
PROBABILITY_NODATA = 255


def decide(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, confidence, cloud probability), uint8, from per-class scores [4, h, w]
    (0..255, ``SCORE_CLASSES`` order): the served graph's rule (kappamask.model.onnx_graph): the
    best class, its score as confidence, and ``round(100 c / (c + k))`` with ``c`` the
    stronger cloudy score and ``k`` the stronger cloud-free one. No-data is the caller's."""
    codes = np.array([int(c) for c in SCORE_CLASSES], np.uint8)
    winner = np.argmax(scores, axis=0)
    classes = codes[winner]
    confidence = np.rint(np.max(scores, axis=0)).astype(np.uint8)
    index = {c: i for i, c in enumerate(SCORE_CLASSES)}
    cloudy = np.maximum(
        scores[index[MaskClass.SEMI_TRANSPARENT_CLOUD]], scores[index[MaskClass.CLOUD]]
    ).astype(np.float32)
    free = np.maximum(scores[index[MaskClass.CLEAR]], scores[index[MaskClass.CLOUD_SHADOW]])
    total = np.maximum(cloudy + free, 1e-6)
    probability = np.rint(100.0 * cloudy / total).astype(np.uint8)
    return classes, confidence, probability


@dataclass(frozen=True)
class ModelSpec:
    """A KappaMask model: Triton name, level, input features in order, their max_v,
    version, where its weights come from, and the SHA-256 of its FP32 ONNX file."""

    name: str
    level: str
    features: tuple[str, ...]
    max_v: tuple[float, ...]
    version_label: str
    origin: str = ORIGIN_UNKNOWN
    sha256: str = ""
    #: How Triton runs it (openvino, onnxruntime, tensorrt) and in which precision
    #: (bf16, f32, fp16; ``auto`` where the serving host decides), and the input's dtype.
    runtime: str = ""
    precision: str = ""
    input_dtype: str = "FP16"
    #: Measured share of real pixels whose class equals FP32's in bfloat16 and in the INT8
    #: variant (`kappamask check-precision`); None where not measured.
    bf16_agreement: float | None = None
    int8_agreement: float | None = None
    #: The network: ``unet`` (the paper's) or ``deeplabv3plus`` (km_predict's default).
    architecture: str = ARCHITECTURE_UNET
    #: SHA-256 of the file the weights were imported from (a Keras HDF5), where recorded.
    weights_sha256: str = ""
    #: How the product's radiometric offset enters the inputs (``OFFSET_RULES``).
    offset_rule: str = OFFSET_TRAINING
    #: A fine-tuned model's parent: the SHA-256 of the ONNX file it started from.
    parent_sha256: str = ""

    def runtime_description(self) -> str:
        """e.g. "openvino, bf16" (empty where the config does not say)."""
        return ", ".join(p for p in (self.runtime, self.precision) if p)

    def provenance(self) -> dict[str, str]:
        """What a result says of the weights that made it."""
        found = {
            "name": self.name,
            "version": self.version_label,
            "origin": self.origin,
            "architecture": self.architecture,
            "onnx_sha256": self.sha256,
        }
        if self.weights_sha256:
            found["weights_sha256"] = self.weights_sha256
        if self.parent_sha256:
            found["parent_sha256"] = self.parent_sha256
        if self.offset_rule != OFFSET_TRAINING:
            found["offset_rule"] = self.offset_rule
        return found


def auto_precision(
    cpu_has_bf16: bool,
    has_int8: bool,
    bf16_agreement: float | None = None,
    int8_agreement: float | None = None,
) -> str:
    """What precision ``auto`` runs a CPU model in: the fastest one whose classes keep to
    FP32's. INT8 (the quantised variant) where its agreement was measured and clears
    ``MIN_INT8_AGREEMENT``: on VNNI and AMX it is the fastest (1.3x bfloat16 on AMX);
    else bfloat16 where the CPU computes it natively, unless its measured agreement is
    under ``MIN_BF16_AGREEMENT`` (weights whose classes hinge on near ties between their
    outputs); else an INT8 variant the quantiser accepted but nobody measured further, on
    CPUs without bfloat16; else FP32.

    triton_models/cpu_model.py decides the same way in Triton's process (a test keeps the
    two in step).
    """
    if has_int8 and int8_agreement is not None and int8_agreement >= MIN_INT8_AGREEMENT:
        return "int8"
    if cpu_has_bf16 and (bf16_agreement is None or bf16_agreement >= MIN_BF16_AGREEMENT):
        return "bf16"
    if has_int8 and int8_agreement is None and not cpu_has_bf16:
        return "int8"
    return "f32"


def parse_agreements(params: Mapping[str, str]) -> tuple[float | None, float | None]:
    """A config's measured bf16 and INT8 agreements (None where absent); ValueError where
    one is not a share between 0 and 1."""
    values = []
    for key in AGREEMENT_PARAMETERS:
        text = params.get(key, "")
        value = float(text) if text else None
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} {text} is not a share between 0 and 1")
        values.append(value)
    return values[0], values[1]
