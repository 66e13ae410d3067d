"""Triton Python-backend model that runs a KappaMask ONNX file with ONNX Runtime.

Used where Triton has no onnxruntime backend (the tritonserver of the nvidia-pytriton
wheel on CPU hosts). Each model version directory links its model.py here. Tensor names
and dtypes are those of the TensorRT and onnxruntime deployments: ``input`` FP16
[N, C, 512, 512] in, ``classes`` and ``confidence`` UINT8 [N, 512, 512] out. The config
parameter ``onnx_file`` picks the file of the version folder (``model.int8.onnx`` where
`kappamask quantize` produced an accepted INT8 variant; ``model.onnx`` otherwise).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One ONNX Runtime session per model instance; all queued requests run as one batch."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(
            args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx")
        )
        options = ort.SessionOptions()
        threads = int(
            os.environ.get("KAPPAMASK_ORT_THREADS", params.get("ort_intra_op_threads", "0"))
        )
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        sizes = [a.shape[0] for a in inputs]
        batch = np.concatenate(inputs).astype(np.float32, copy=False)
        classes, confidence = self.session.run(["classes", "confidence"], {"input": batch})
        responses = []
        start = 0
        for size in sizes:
            stop = start + size
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("classes", np.ascontiguousarray(classes[start:stop])),
                        pb_utils.Tensor("confidence", np.ascontiguousarray(confidence[start:stop])),
                    ]
                )
            )
            start = stop
        return responses

    def finalize(self):
        self.session = None
