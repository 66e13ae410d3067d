"""The served KappaMask U-Net: its layers (``architecture``) and the ONNX graph the
service runs (``onnx_graph``: network, class head, confidence and cloud probability).
Training, export from PyTorch, quantisation, Keras import and evaluation are tools beside
the service: ``kappamask.tools``."""
