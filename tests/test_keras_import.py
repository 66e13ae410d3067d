"""`kappamask import-keras` against the real thing: Keras 2 (TensorFlow 2.15, in its own
virtual environment because it pins protobuf and ml_dtypes below what ONNX needs) builds
the published U-Net with random weights and writes them with ``save_weights``; the
imported ONNX must give the same classes and confidence on random and real inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from rasterio.windows import Window

from kappamask.bands import (
    ARCHITECTURE_FEATURES,
    ARCHITECTURE_MAX_V,
    L1C_FEATURES,
    L1C_MAX_V,
    L2A_FEATURES,
    L2A_MAX_V,
    MaskClass,
)
from kappamask.cli import main
from kappamask.errors import InvalidInputError
from kappamask.geometry.grid import output_grid
from kappamask.inference.repository import spec_from_onnx
from kappamask.reading.reader import BandReader
from kappamask.sources import open_safe
from kappamask.tools.keras_import import import_keras

from .conftest import T29UNU, make_l1c_safe, write_keras_h5

ROOT = Path(__file__).parents[1]
KERAS_SCRIPT = Path(__file__).parent / "tools" / "keras_unet.py"
TF_REQUIREMENT = "tensorflow-cpu>=2.15,<2.16"
SIZE = 128


@pytest.fixture(scope="session")
def keras_python() -> Path:
    """A Python with TensorFlow 2.15 / Keras 2, made once under .cache/ (test-only)."""
    venv = Path(os.environ.get("KAPPAMASK_TF_VENV", ROOT / ".cache" / "venv-tf"))
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import tensorflow, h5py"]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", TF_REQUIREMENT, "h5py"], check=True
        )
    return python


def _real_crop(
    features: tuple[str, ...], max_v: tuple[float, ...], product: Path, size: int = SIZE
) -> np.ndarray:
    """A size x size window of real normalised features (zero-padded where the product
    ends, which also exercises the no-data rule)."""
    safe = open_safe(product)
    grid = output_grid(safe, 60 if product == T29UNU else 10)
    h, w = min(size, grid.height), min(size, grid.width)
    with BandReader(safe, features, max_v, grid) as reader:
        values, _valid = reader.read(Window(grid.width - w, grid.height - h, w, h))
    out = np.zeros((len(features), size, size), np.float32)
    out[:, :h, :w] = values
    return out


def _inputs(channels: int, real: np.ndarray | None, seed: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (2, channels, size, size)).astype(np.float32)
    x[1, :, :32, :32] = 0.0  # a no-data corner
    if real is not None:
        x = np.concatenate([x, real[None]])
    return x


def _expected(probs: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes and confidence by the served head's rule, from Keras' sigmoid outputs;
    and where the top two real classes are an exact tie (float32)."""
    real = probs[:, 1:5]
    codes = np.array(
        [
            MaskClass.CLEAR,
            MaskClass.CLOUD_SHADOW,
            MaskClass.SEMI_TRANSPARENT_CLOUD,
            MaskClass.CLOUD,
        ],
        np.uint8,
    )
    no_data = np.abs(x).max(axis=1) == 0
    classes = np.where(no_data, MaskClass.MISSING, codes[real.argmax(axis=1)])
    top = np.where(no_data, probs[:, 5], real.max(axis=1))
    confidence = np.round(top * 255).astype(np.int32)
    ordered = np.sort(real, axis=1)
    ties = (ordered[:, -1] - ordered[:, -2]) < 1e-6
    return classes, confidence, ties


def _run_onnx(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, ...]:
    # (the class scores are the tensor head.conv2.out in every served graph)
    # expose the sigmoid outputs too, to measure the importer's deviation from Keras
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("head.conv2.out", onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(session.run(["classes", "confidence", "head.conv2.out"], {"input": x}))


CASES = [
    pytest.param("L1C", 64, L1C_FEATURES, L1C_MAX_V, id="L1C-64-filters"),
    pytest.param("L2A", 32, L2A_FEATURES, L2A_MAX_V, id="L2A-32-filters"),
    pytest.param("L2A", 32, ("B07", *L2A_FEATURES), (0.25, *L2A_MAX_V), id="L2A-14-features"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("level", "filters", "features", "max_v"), CASES)
def test_import_matches_keras(
    keras_python: Path,
    tmp_path: Path,
    level: str,
    filters: int,
    features: tuple[str, ...],
    max_v: tuple[float, ...],
) -> None:
    channels = len(features)
    real = None
    if channels == 13:
        product = T29UNU if level == "L2A" else make_l1c_safe(tmp_path)
        real = _real_crop(features, max_v, product)
    x = _inputs(channels, real, seed=filters + channels)
    np.savez(tmp_path / "inputs.npz", x=x)
    weights = tmp_path / f"{level.lower()}_unet.hdf5"
    subprocess.run(
        [
            str(keras_python),
            str(KERAS_SCRIPT),
            str(weights),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "probs.npz"),
            "--channels",
            str(channels),
            "--filters",
            str(filters),
        ],
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
    )
    probs = np.load(tmp_path / "probs.npz")["probs"]
    out = tmp_path / "model.onnx"
    model = import_keras(weights, level, out, features=features, max_v=max_v)
    classes, confidence, onnx_probs = _run_onnx(model, x)
    expected, expected_conf, ties = _expected(probs, x)
    deviation = float(np.abs(onnx_probs - probs).max())
    differing = int((classes != expected).sum())
    print(
        f"{level} {filters} filters {channels} features: max |ONNX - Keras| = "
        f"{deviation:.2e}, {differing} of {classes.size} classes differ (ties)"
    )
    assert deviation < 1e-4
    # random weights still separate classes: the comparison is not between constants
    assert len(np.unique(expected[expected != MaskClass.MISSING])) >= 2
    assert np.ptp(expected_conf[expected != MaskClass.MISSING]) > 10
    assert ((classes == expected) | ties).all()
    assert np.abs(confidence.astype(np.int32) - expected_conf).max() <= 1
    assert (classes[1, :32, :32] == MaskClass.MISSING).all()
    # the served configuration reads features, max_v and level from the file
    spec = spec_from_onnx(out)
    assert (spec.level, spec.features) == (level, features)
    assert spec.max_v == pytest.approx(max_v)


def test_files_that_are_not_the_unet_are_refused(tmp_path: Path) -> None:
    not_h5 = tmp_path / "x.hdf5"
    not_h5.write_text("not hdf5")
    with pytest.raises(InvalidInputError, match="not an HDF5 file"):
        import_keras(not_h5, "L2A", tmp_path / "m.onnx")
    bn = tmp_path / "bn.hdf5"
    write_keras_h5(bn, {"batch_normalization": {"gamma": np.ones(4), "beta": np.zeros(4)}})
    with pytest.raises(InvalidInputError, match="not the KappaMask U-Net"):
        import_keras(bn, "L2A", tmp_path / "m.onnx")
    short = tmp_path / "short.hdf5"
    write_keras_h5(
        short,
        {
            "conv2d": {
                "kernel": np.zeros((3, 3, 13, 8), np.float32),
                "bias": np.zeros(6, np.float32),
            }
        },
    )
    with pytest.raises(InvalidInputError, match="has 8 outputs"):
        import_keras(short, "L2A", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_cli_import_and_install(keras_python: Path, tmp_path: Path) -> None:
    x = _inputs(13, None, seed=1)
    np.savez(tmp_path / "inputs.npz", x=x)
    weights = tmp_path / "l2a_unet.hdf5"
    subprocess.run(
        [
            str(keras_python),
            str(KERAS_SCRIPT),
            str(weights),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "probs.npz"),
            "--channels",
            "13",
            "--filters",
            "32",
        ],
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    repo = tmp_path / "repo"
    (repo / "onnx_runtime_model.py").parent.mkdir(parents=True)
    (repo / "onnx_runtime_model.py").write_text("# backend stand-in for the symlink\n")
    runner = CliRunner()
    wrong = runner.invoke(
        main,
        [
            "import-keras",
            str(weights),
            "--level",
            "L2A",
            "--filters",
            "64",
            "--out",
            str(tmp_path / "m.onnx"),
        ],
    )
    assert wrong.exit_code != 0 and "32 base filters, not 64" in wrong.output
    done = runner.invoke(
        main,
        [
            "import-keras",
            str(weights),
            "--level",
            "L2A",
            "--out",
            str(tmp_path / "m.onnx"),
            "--install",
            "--repository",
            str(repo),
        ],
    )
    assert done.exit_code == 0, done.output
    config = (repo / "kappamask_l2a" / "config.pbtxt").read_text()
    assert "keras-l2a_unet-" in config and ",".join(L2A_FEATURES) in config
    assert (repo / "kappamask_l2a" / "1" / "model.onnx").is_file()


DEEPLAB_SCRIPT = Path(__file__).parent / "tools" / "keras_deeplab.py"
#: The smallest side km_predict's DeepLabv3+ takes (its dilation-18 padding must fit the
#: 1/16 map); the service feeds 512.
DEEPLAB_SIZE = 320


@pytest.mark.slow
@pytest.mark.parametrize("level", ["L1C", "L2A"])
def test_deeplab_import_matches_keras(keras_python: Path, tmp_path: Path, level: str) -> None:
    """km_predict's DeepLabv3+ built by Keras itself, random weights and BatchNorm
    statistics far from the identity: the imported graph gives Keras' classes wherever
    Keras' top two classes are more than 1e-3 apart, and its confidence within 1."""
    features = ARCHITECTURE_FEATURES["deeplabv3plus"][level]
    max_v = ARCHITECTURE_MAX_V["deeplabv3plus"][level]
    real = None
    if level == "L2A":  # 14 features, B07 included, from the real product
        real = _real_crop(features, max_v, T29UNU, DEEPLAB_SIZE)
    x = _inputs(len(features), real, seed=len(features), size=DEEPLAB_SIZE)
    np.savez(tmp_path / "inputs.npz", x=x)
    weights = tmp_path / f"{level.lower()}_deeplabv3plus.hdf5"
    subprocess.run(
        [
            str(keras_python),
            str(DEEPLAB_SCRIPT),
            str(weights),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "probs.npz"),
            "--channels",
            str(len(features)),
            "--size",
            str(DEEPLAB_SIZE),
        ],
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
    )
    probs = np.load(tmp_path / "probs.npz")["probs"]
    out = tmp_path / "model.onnx"
    model = import_keras(weights, level, out)
    classes, confidence, onnx_probs = _run_onnx(model, x)
    expected, expected_conf, _ties = _expected(probs, x)
    ordered = np.sort(probs[:, 1:5], axis=1)
    decided = (ordered[:, -1] - ordered[:, -2]) > 1e-3
    deviation = float(np.abs(onnx_probs - probs).max())
    print(
        f"DeepLabv3+ {level}: max |ONNX - Keras| = {deviation:.2e}, "
        f"{int((classes != expected).sum())} of {classes.size} classes differ, "
        f"{int((~decided).sum())} pixels within 1e-3 of a tie"
    )
    assert len(np.unique(expected[expected != MaskClass.MISSING])) >= 2
    assert np.ptp(expected_conf[expected != MaskClass.MISSING]) > 10
    assert (classes == expected)[decided].all()
    assert np.abs(confidence.astype(np.int32) - expected_conf).max() <= 1
    assert (classes[1, :32, :32] == MaskClass.MISSING).all()
    spec = spec_from_onnx(out)
    assert (spec.level, spec.features) == (level, features)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["kappamask.architecture"] == "deeplabv3plus"
