"""Run with a Python that has TensorFlow 2.15 (Keras 2), never by the service:

    python keras_unet.py OUT.h5 INPUTS.npz OUTPUTS.npz --channels 13 --filters 64

Builds the KappaMask U-Net of ARCHITECTURE.md §3 in Keras (channels last, the layer order of the
published model), gives it seeded random He-normal weights and non-zero biases, writes
them with ``save_weights`` as HDF5, and writes the network's sigmoid outputs for the
inputs (``x``: N x C x H x W, as the service feeds them) to OUTPUTS.npz.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.keras import layers


def unet(channels: int, filters: int, outputs: int = 6) -> tf.keras.Model:
    inputs = layers.Input((None, None, channels))
    x, skips = inputs, []
    for level in range(5):
        width = filters * 2**level
        x = layers.Conv2D(width, 3, activation="relu", padding="same")(x)
        x = layers.Conv2D(width, 3, activation="relu", padding="same")(x)
        if level >= 3:
            x = layers.Dropout(0.5)(x)
        if level < 4:
            skips.append(x)
            x = layers.MaxPooling2D(2)(x)
    for level in range(3, -1, -1):
        width = filters * 2**level
        x = layers.Conv2D(width, 2, activation="relu", padding="same")(layers.UpSampling2D(2)(x))
        x = layers.concatenate([skips[level], x], axis=3)
        x = layers.Conv2D(width, 3, activation="relu", padding="same")(x)
        x = layers.Conv2D(width, 3, activation="relu", padding="same")(x)
    x = layers.Conv2D(2, 3, activation="relu", padding="same")(x)
    return tf.keras.Model(inputs, layers.Conv2D(outputs, 1, activation="sigmoid")(x))


def arguments(size_option: str) -> argparse.Namespace:
    """WEIGHTS INPUTS OUTPUTS --channels N --<size_option> N [--seed N], the seed set."""
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument(f"--{size_option}", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tf.keras.utils.set_random_seed(args.seed)
    return args


def write(
    model: tf.keras.Model,
    args: argparse.Namespace,
    prepare: Callable[[tf.keras.Model, np.ndarray], None] | None = None,
) -> None:
    """Save the weights (after ``prepare`` saw the inputs) and the outputs for the inputs."""
    x = np.load(args.inputs)["x"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if prepare is not None:
        prepare(model, x)
    model.save_weights(args.weights)
    probs = model.predict(x, batch_size=1, verbose=0).transpose(0, 3, 1, 2)
    np.savez(args.outputs, probs=probs)


def main() -> None:
    args = arguments("filters")
    model = unet(args.channels, args.filters)
    rng = np.random.default_rng(args.seed)
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            kernel, bias = layer.get_weights()
            # He-normal keeps the activations' scale through the ReLU layers, so the
            # sigmoid outputs spread over (0, 1) instead of sitting at 0.5
            fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
            kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape)
            layer.set_weights(
                [kernel.astype(np.float32), rng.normal(0.0, 0.05, bias.shape).astype(np.float32)]
            )
    write(model, args)


if __name__ == "__main__":
    main()
