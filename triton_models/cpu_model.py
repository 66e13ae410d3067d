"""Triton Python-backend model that runs a KappaMask ONNX file on the CPU.

Used where Triton has no OpenVINO or ONNX Runtime backend of its own (the tritonserver of
the nvidia-pytriton wheel). Each model version directory links its model.py here.
Tensors are those of every other deployment: ``input`` FP16 [N, C, 512, 512] in,
the UINT8 outputs the model's config lists out (``classes``, ``confidence``,
``cloud_probability`` [N, 512, 512]; ``scores`` [N, 4, 512, 512]).

Runtime (config parameter ``runtime``, environment ``KAPPAMASK_CPU_RUNTIME`` overrides):

- ``openvino`` (default): OpenVINO in throughput mode, every crop of a batch its own
  infer request so that all of OpenVINO's streams work at once. Precision
  (``KAPPAMASK_CPU_PRECISION`` or the config's ``precision``): ``auto`` takes the fastest
  precision whose classes keep to FP32's, by the agreements `kappamask check-precision`
  measured on real crops and wrote into the config (``bf16_agreement``,
  ``int8_agreement``): the INT8 variant (``int8_file``) where its agreement is at least
  99.5 %; else bfloat16 on ``model.onnx`` where the CPU computes it natively (AMX or
  AVX512-BF16, OpenVINO's BF16 capability) and its agreement, if measured, is at least
  99.9 %; else, on CPUs without bfloat16, an INT8 variant nobody measured beyond the
  quantiser's acceptance; else FP32 (kappamask.inference.model_spec.auto_precision, which
  this mirrors). ``bf16``, ``f32`` and ``int8`` force one. Without the openvino package,
  or if it cannot compile the model, the model falls back to ONNX Runtime and says so in
  the log.
- ``onnxruntime``: ONNX Runtime on the INT8 variant where the same rule allows it (its
  measured agreement at least 99.5 %, or not measured), else ``model.onnx``.

What was chosen is logged once per model instance, e.g. ``kappamask_l1c: OpenVINO
2026.4.1, bf16, 2 streams``.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

RUNTIMES = ("openvino", "onnxruntime")
PRECISIONS = ("auto", "bf16", "f32", "int8")


#: kappamask.inference.model_spec.MIN_BF16_AGREEMENT and MIN_INT8_AGREEMENT.
MIN_BF16_AGREEMENT, MIN_INT8_AGREEMENT = 0.999, 0.995


def auto_precision(cpu_has_bf16, has_int8, bf16_agreement=None, int8_agreement=None):
    """kappamask.inference.model_spec.auto_precision (this file runs in Triton's Python
    stub, which need not have kappamask installed)."""
    if has_int8 and int8_agreement is not None and int8_agreement >= MIN_INT8_AGREEMENT:
        return "int8"
    if cpu_has_bf16 and (bf16_agreement is None or bf16_agreement >= MIN_BF16_AGREEMENT):
        return "bf16"
    if has_int8 and int8_agreement is None and not cpu_has_bf16:
        return "int8"
    return "f32"


def agreement(params, key):
    """A measured agreement from the config's parameters; None where absent."""
    value = params.get(key, "")
    return float(value) if value else None


def choose(requested, cpu_has_bf16, int8_file, bf16_agreement=None, int8_agreement=None):
    """(precision, file, OpenVINO inference precision hint) of a CPU model."""
    if requested == "auto":
        requested = auto_precision(cpu_has_bf16, bool(int8_file), bf16_agreement,
                                   int8_agreement)  # fmt: skip
    if requested == "int8":
        if not int8_file:
            raise ValueError("precision int8 asked, but the model has no INT8 variant")
        return "int8", int8_file, "f32"  # the quantiser's FP32 layers stay FP32
    return requested, "model.onnx", requested


class _OpenVINO:
    """The model compiled by OpenVINO, one static-shape infer request per crop."""

    def __init__(self, folder, channels, precision, params, threads, outputs, half_input):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        self.outputs = outputs
        core = ov.Core()
        bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.precision, name, hint = choose(
            precision, bf16, params.get("int8_file", ""),
            agreement(params, "bf16_agreement"), agreement(params, "int8_agreement"),
        )  # fmt: skip
        model = core.read_model(os.path.join(folder, name))
        # one crop per request: a static shape compiles to the fastest kernels
        model.reshape([1, channels, 512, 512])
        if half_input:
            # FP16 crops go in as they come: the compiled model converts them with the
            # CPU's vector instructions, where numpy 1.x casts one element at a time
            # (10-18 ms a crop, 5-10 core-seconds of a full product).
            ppp = PrePostProcessor(model)
            ppp.input(0).tensor().set_element_type(ov.Type.f16)
            model = ppp.build()
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": hint}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, max(1, requests))
        self.describe = f"OpenVINO {ov.__version__.split('-')[0]}, {self.precision}, " \
                        f"{self.streams} streams"  # fmt: skip

    def run(self, batch):
        out = {name: np.empty((len(batch), *self.compiled.output(name).shape[1:]), np.uint8)
               for name in self.outputs}  # fmt: skip

        def done(request, index):
            for name, array in out.items():
                array[index] = request.get_tensor(name).data[0]

        self.queue.set_callback(done)
        for index, crop in enumerate(batch):
            self.queue.start_async({0: crop[None]}, index)
        self.queue.wait_all()
        return out


class _OnnxRuntime:
    def __init__(self, path, threads, outputs):
        import onnxruntime as ort

        self.outputs = outputs
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.describe = f"ONNX Runtime {ort.__version__}, {os.path.basename(path)}"

    def run(self, batch):
        batch = batch.astype(np.float32, copy=False)
        arrays = self.session.run(self.outputs, {"input": batch})
        return dict(zip(self.outputs, arrays, strict=True))


class TritonPythonModel:
    """One runtime per model instance; all queued requests run as one batch."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        channels = config["input"][0]["dims"][0]
        half_input = config["input"][0]["data_type"] == "TYPE_FP16"
        threads = int(
            os.environ.get("KAPPAMASK_ORT_THREADS", params.get("ort_intra_op_threads", "0"))
        )
        instances = sum(group.get("count", 1) for group in config.get("instance_group", []))
        if threads == 0 and instances > 1:
            # instances run side by side: each on its share of the cores, not all of them
            threads = max(1, len(os.sched_getaffinity(0)) // instances)
        runtime = os.environ.get("KAPPAMASK_CPU_RUNTIME") or params.get("runtime", "openvino")
        precision = os.environ.get("KAPPAMASK_CPU_PRECISION") or params.get("precision", "auto")
        logger = pb_utils.Logger
        if runtime not in RUNTIMES or precision not in PRECISIONS:
            raise pb_utils.TritonModelException(
                f"{config['name']}: runtime must be one of {RUNTIMES} and precision one of "
                f"{PRECISIONS}, not {runtime!r} / {precision!r}"
            )
        int8_file = params.get("int8_file", "")
        outputs = [o["name"] for o in config["output"]]
        self.runtime = None
        if runtime == "openvino":
            try:
                self.runtime = _OpenVINO(folder, channels, precision, params, threads,
                                         outputs, half_input)  # fmt: skip
            except ImportError:
                logger.log_warn(f"{config['name']}: the openvino package is not installed, "
                                "falling back to ONNX Runtime")  # fmt: skip
            except Exception as err:  # whatever OpenVINO cannot compile or run here
                logger.log_warn(f"{config['name']}: OpenVINO cannot run the model ({err}), "
                                "falling back to ONNX Runtime")  # fmt: skip
        if self.runtime is None:
            # the INT8 variant unless its measured agreement falls short or FP32 is forced
            use_int8 = bool(int8_file) and precision in ("auto", "int8") and auto_precision(
                False, True, None, agreement(params, "int8_agreement")) == "int8"  # fmt: skip
            path = os.path.join(folder, int8_file if use_int8 else "model.onnx")
            self.runtime = _OnnxRuntime(path, threads, outputs)
        logger.log_info(f"{config['name']}: {self.runtime.describe}")

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        sizes = [a.shape[0] for a in inputs]
        batch = np.concatenate(inputs)  # FP16 or FP32 as the config says: the runtime converts
        out = self.runtime.run(batch)
        responses = []
        start = 0
        for size in sizes:
            stop = start + size
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(array[start:stop]))
                       for name, array in out.items()]  # fmt: skip
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses

    def finalize(self):
        self.runtime = None
