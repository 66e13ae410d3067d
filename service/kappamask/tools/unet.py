"""PyTorch U-Net with the published KappaMask architecture (needs the ``train`` extra)."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from kappamask.bands import NUM_NETWORK_OUTPUTS
from kappamask.model.architecture import LEVELS, PAPER_HEAD_CHANNELS, conv_specs

#: The sigmoid output layer: no normalisation after it.
OUTPUT_LAYER = "head.conv2"


class UNet(nn.Module):
    """5-level U-Net, channels first; returns the 6 sigmoid outputs [N, 6, H, W].

    Convolutions keep the size ('same'); the 2x2 up-convolutions are padded at the
    bottom/right as Keras does, so imported Keras weights line up exactly.

    ``batch_norm`` puts a BatchNorm2d after every ReLU convolution for training only.
    The paper's network has none, and without them its activations grow with every Adam
    step (seen in distillation: head inputs of 1e5 after 1600 steps, sigmoid outputs
    saturated, shadow and semi-transparent never learnt). ``numpy_weights`` folds each
    normalisation into its convolution (eval-mode statistics), so the exported graph is the
    paper's architecture exactly.
    """

    def __init__(
        self,
        in_channels: int,
        base_filters: int = 32,
        num_outputs: int = NUM_NETWORK_OUTPUTS,
        batch_norm: bool = False,
        head_channels: int = PAPER_HEAD_CHANNELS,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.base_filters = base_filters
        self.head_channels = head_channels
        self.convs: nn.ModuleDict = nn.ModuleDict()
        self.norms: nn.ModuleDict = nn.ModuleDict()
        for spec in conv_specs(in_channels, base_filters, num_outputs, head_channels):
            key = spec.name.replace(".", "_")
            self.convs[key] = nn.Conv2d(
                spec.in_channels, spec.out_channels, spec.kernel, padding=(spec.kernel - 1) // 2
            )
            if batch_norm and spec.name != OUTPUT_LAYER:
                self.norms[key] = nn.BatchNorm2d(spec.out_channels)
        self.dropout = nn.Dropout(0.5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation for the ReLU layers (PyTorch's default shrinks the signal by
        about half per layer: after 23 of them the head saw almost nothing), and a
        positive bias on the head's two-channel ReLU layer. That layer is the network's
        bottleneck: once both of its channels output 0 for every pixel, no gradient
        reaches anything before it and the model is stuck predicting one class (seen in
        distillation runs: dead after a few hundred steps)."""
        for conv in self.convs.values():
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        head = self.layer("head.conv1")
        assert head.bias is not None
        nn.init.constant_(head.bias, 1.0)
        out = self.layer(OUTPUT_LAYER)
        nn.init.xavier_uniform_(out.weight)  # sigmoid, not ReLU

    def layer(self, name: str) -> nn.Conv2d:
        """The Conv2d of a ConvSpec name (``enc1.conv1`` ...)."""
        return cast(nn.Conv2d, self.convs[name.replace(".", "_")])

    def _conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        conv = self.layer(name)
        if conv.kernel_size[0] % 2 == 0:
            # Keras 'same' for an even kernel: the extra pixel at the bottom/right.
            x = nn.functional.pad(x, (0, 1, 0, 1))
        y = conv(x)
        key = name.replace(".", "_")
        if key in self.norms:
            y = self.norms[key](y)
        return torch.relu(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in range(1, LEVELS + 1):
            x = self._conv(f"enc{level}.conv2", self._conv(f"enc{level}.conv1", x))
            if level >= LEVELS - 1:
                x = self.dropout(x)
            if level < LEVELS:
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
        for level in range(LEVELS - 1, 0, -1):
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self._conv(f"up{level}.conv", x)
            x = torch.cat([skips[level - 1], x], dim=1)
            x = self._conv(f"dec{level}.conv2", self._conv(f"dec{level}.conv1", x))
        x = self._conv("head.conv1", x)
        return torch.sigmoid(self.layer("head.conv2")(x))

    def numpy_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Weights as numpy arrays keyed by ConvSpec name: (kernel [O, I, kh, kw], bias)."""
        out = {}
        for spec in conv_specs(
            self.in_channels, self.base_filters, head_channels=self.head_channels
        ):
            conv = self.layer(spec.name)
            assert conv.bias is not None
            weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
            key = spec.name.replace(".", "_")
            if key in self.norms:
                bn = cast(nn.BatchNorm2d, self.norms[key])
                assert bn.running_var is not None and bn.running_mean is not None
                scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
                weight = weight * scale[:, None, None, None]
                bias = (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()
            out[spec.name] = (weight.float().numpy(), bias.float().numpy())
        return out
