"""The U-Net of the published KappaMask weights, described once as data.

Both the PyTorch module (training) and the ONNX graph builder (export, Keras import)
walk this description, so parameter names and layer order cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from kappamask.bands import NUM_NETWORK_OUTPUTS

LEVELS = 5


@dataclass(frozen=True)
class ConvSpec:
    """One Conv2D of the network: parameter name, channels, kernel and activation."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    activation: str  # "relu" or "sigmoid"


#: Channels of the head's ReLU layer in the published network.
PAPER_HEAD_CHANNELS = 2


def conv_specs(
    in_channels: int,
    base_filters: int = 32,
    num_outputs: int = NUM_NETWORK_OUTPUTS,
    head_channels: int = PAPER_HEAD_CHANNELS,
) -> list[ConvSpec]:
    """Every Conv2D of the U-Net in the order Keras creates them (ARCHITECTURE.md §3).

    ``head_channels``: the paper's head funnels every pixel through 2 ReLU channels. Both
    die within ten Adam steps when this network is trained from scratch here (every pixel
    0: the output stops depending on the input, for good), so this project's own weights
    use a wider head; published weights keep 2.
    """
    widths = [base_filters * 2**i for i in range(LEVELS)]
    specs: list[ConvSpec] = []
    channels = in_channels
    for level, width in enumerate(widths, start=1):
        specs.append(ConvSpec(f"enc{level}.conv1", channels, width, 3, "relu"))
        specs.append(ConvSpec(f"enc{level}.conv2", width, width, 3, "relu"))
        channels = width
    for level in range(LEVELS - 1, 0, -1):
        width = widths[level - 1]
        specs.append(ConvSpec(f"up{level}.conv", channels, width, 2, "relu"))
        specs.append(ConvSpec(f"dec{level}.conv1", 2 * width, width, 3, "relu"))
        specs.append(ConvSpec(f"dec{level}.conv2", width, width, 3, "relu"))
        channels = width
    specs.append(ConvSpec("head.conv1", channels, head_channels, 3, "relu"))
    specs.append(ConvSpec("head.conv2", head_channels, num_outputs, 1, "sigmoid"))
    return specs
