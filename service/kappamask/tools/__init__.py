"""Tools beside the service: training and distillation (PyTorch, the ``train`` extra),
export to ONNX, INT8 quantisation, import of the published Keras weights and evaluation
against reference masks (the ``tools`` extra). The service never imports them; the CLI
offers them as `kappamask train`, `distill`, `quantize`, `import-keras`, `fetch-weights`
and `evaluate` (``kappamask.tools.cli``)."""
