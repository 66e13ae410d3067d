"""Run with a Python that has TensorFlow 2.15 (Keras 2), never by the service:

    python keras_deeplab.py OUT.h5 INPUTS.npz OUTPUTS.npz --channels 14 --size 320

Builds a DeepLabv3+ with km_predict's layout (kappamask.model.deeplab's docstring lists
it: the Xception-style extractor with its symmetric padding layer, the shortcut chain, the
unused 1536/2048-filter exit layers that a weights file does not hold, ASPP and the
decoder), in the order km_predict creates its layers, so that the automatic layer names
and their numbers are those of km_predict's files. Seeded random He-normal weights and
non-trivial BatchNorm statistics, the last convolution set to spread the classes over
the inputs (``spread_classes``); written with ``save_weights`` as HDF5; the softmax for
the inputs (``x``: N x C x H x W, as the service feeds them) to OUTPUTS.npz.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from keras_unet import arguments, write  # beside this file, as the test runs it
from tensorflow.keras import layers


class SymmetricSamePad(layers.Layer):
    """What a "same" convolution of this kernel, stride and dilation needs, odd pixel
    after, as TensorFlow's SYMMETRIC padding (km_predict's CustomPad)."""

    def __init__(self, kernel: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.span, self.stride = kernel + (kernel - 1) * (dilation - 1), stride

    def call(self, x: tf.Tensor) -> tf.Tensor:
        pads = []
        for side in (x.shape[1], x.shape[2]):
            rest = side % self.stride
            total = max(self.span - (self.stride if rest == 0 else rest), 0)
            pads.append((total // 2, total - total // 2))
        return tf.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), "SYMMETRIC")


def conv_bn(x: tf.Tensor, filters: int, kernel: int, stride: int = 1) -> tf.Tensor:
    x = SymmetricSamePad(kernel, stride)(x)
    x = layers.Conv2D(filters, kernel, strides=stride, use_bias=False)(x)
    return layers.BatchNormalization()(x)


def sep_bn(x: tf.Tensor, filters: int) -> tf.Tensor:
    x = SymmetricSamePad(3)(x)
    x = layers.SeparableConv2D(filters, 3, use_bias=False)(x)
    return layers.BatchNormalization()(x)


def block(
    x: tf.Tensor, filters: int, kernel: int = 3, dilation: int = 1, bias: bool = False
) -> tf.Tensor:
    x = SymmetricSamePad(kernel, 1, dilation)(x)
    x = layers.Conv2D(filters, kernel, dilation_rate=dilation, use_bias=bias)(x)
    return tf.nn.relu(layers.BatchNormalization()(x))


def pool(x: tf.Tensor) -> tf.Tensor:
    return layers.MaxPool2D(3, strides=2)(SymmetricSamePad(3, 2)(x))


def deeplab(channels: int, size: int, classes: int = 6) -> tf.keras.Model:
    inputs = layers.Input((size, size, channels))
    # entry flow; the shortcut chain starts at the second convolution
    x = layers.ReLU()(conv_bn(inputs, 32, 3, 2))
    shortcut = layers.ReLU()(conv_bn(x, 64, 3))
    x, low = shortcut, None
    for i, filters in enumerate((128, 256, 728)):
        y = layers.ReLU()(x) if i else x
        y = sep_bn(layers.ReLU()(sep_bn(y, filters)), filters)
        if i == 1:
            low = y
        shortcut = conv_bn(shortcut, filters, 1, 2)
        x = layers.Add()([shortcut, pool(y)])
    for _ in range(8):
        y = x
        for _ in range(3):
            y = sep_bn(layers.ReLU()(y), 728)
        x = layers.Add()([x, layers.ReLU()(y)])
    y = layers.ReLU()(sep_bn(layers.ReLU()(x), 728))
    features = sep_bn(y, 1024)
    # the rest of the exit flow: built, as km_predict builds it, on no path to the output
    unused = layers.Add()([conv_bn(x, 1024, 1, 2), pool(features)])
    unused = sep_bn(layers.ReLU()(sep_bn(unused, 1536)), 2048)
    layers.Dense(1000, activation="softmax")(layers.GlobalAvgPool2D()(unused))
    # ASPP
    side = features.shape[1]
    image = block(layers.AveragePooling2D(side)(features), 256, 1, bias=True)
    image = layers.UpSampling2D(side, interpolation="bilinear")(image)
    branches = [block(features, 256, 1)] + [block(features, 256, 3, r) for r in (6, 12, 18)]
    aspp = block(layers.Concatenate()([image, *branches]), 256, 1)
    # decoder
    up = layers.UpSampling2D(4, interpolation="bilinear")(aspp)
    x = layers.Concatenate()([up, block(low, 48, 1)])
    x = layers.UpSampling2D(4, interpolation="bilinear")(block(block(x, 256), 256))
    outputs = layers.Conv2D(classes, 1, activation="softmax")(x)
    return tf.keras.Model(inputs, outputs)


def randomise(model: tf.keras.Model, rng: np.random.Generator) -> None:
    """He-normal kernels (the activations keep their scale through the ReLUs), small
    biases, and BatchNorms whose statistics are far from the identity."""
    for layer in model.layers:
        values = []
        for weight in layer.weights:
            name, shape = weight.name.rsplit("/", 1)[-1].split(":")[0], weight.shape
            if name in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                fan_in = int(np.prod(shape[:-1]))
                values.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape))
            elif name == "gamma":
                values.append(rng.uniform(0.5, 1.5, shape))
            elif name == "moving_variance":
                values.append(rng.uniform(0.5, 2.0, shape))
            else:  # bias, beta, moving_mean
                values.append(rng.normal(0.0, 0.1, shape))
        if values:
            layer.set_weights([v.astype(np.float32) for v in values])


def spread_classes(model: tf.keras.Model, x: np.ndarray) -> None:
    """Random weights leave the decoder's features almost constant over the image (their
    spatial spread is about 1 % of their mean), so every pixel would get one class and
    the comparison would be between constants. The last convolution is set to centre and
    scale its logits on these inputs, which spreads the classes over the image."""
    last = model.layers[-1]
    features = tf.keras.Model(model.inputs, last.input).predict(x, batch_size=1, verbose=0)
    kernel, _bias = last.get_weights()
    logits = features @ kernel[0, 0]
    scale = 1.0 / max(float(logits.std(axis=(0, 1, 2)).mean()), 1e-12)
    kernel = kernel * scale
    bias = -logits.reshape(-1, logits.shape[-1]).mean(axis=0) * scale
    last.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])


def main() -> None:
    args = arguments("size")
    model = deeplab(args.channels, args.size)
    randomise(model, np.random.default_rng(args.seed))
    write(model, args, spread_classes)


if __name__ == "__main__":
    main()
