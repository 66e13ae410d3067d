"""The KappaMask U-Net: architecture, ONNX export, training (PyTorch only here, optional)."""
