"""Inference: the Triton model repository, a local Triton server, and the client."""
