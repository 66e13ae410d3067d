"""What a model declares about itself: the one description shared by the repository
(which writes it into config.pbtxt) and the client (which reads it back from Triton)."""

from __future__ import annotations

from dataclasses import dataclass

#: Where a model's weights come from, as every result states it.
ORIGIN_OFFICIAL = "official"  # KappaZeta's published weights (kappamask fetch-weights)
ORIGIN_BOOTSTRAP = "bootstrap"  # this project's own (kappamask distill / train)
ORIGIN_IMPORTED = "keras-import"  # a Keras file a user converted (kappamask import-keras)
ORIGIN_UNKNOWN = "unknown"  # a model installed before origins were recorded
#: A CPU config's precision: decided where the model runs, by what its CPU computes.
PRECISION_AUTO = "auto"

#: The tensors of every served model, on every backend: normalised features in; per pixel
#: the mask code, the winning sigmoid x 255, and the cloud probability in percent (255
#: where the input has no data; see kappamask.model.onnx_graph).
INPUT = "input"
OUTPUT_CLASSES = "classes"
OUTPUT_CONFIDENCE = "confidence"
OUTPUT_PROBABILITY = "cloud_probability"
OUTPUTS = (OUTPUT_CLASSES, OUTPUT_CONFIDENCE, OUTPUT_PROBABILITY)
#: The probability's value where the input has no data.
PROBABILITY_NODATA = 255


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

    def runtime_description(self) -> str:
        """e.g. "openvino, bf16" (empty where the config does not say)."""
        return ", ".join(p for p in (self.runtime, self.precision) if p)

    def provenance(self) -> dict[str, str]:
        """What a result says of the weights that made it."""
        return {"name": self.name, "version": self.version_label, "origin": self.origin,
                "onnx_sha256": self.sha256}  # fmt: skip
