"""The Triton model repository: configs generated from the ONNX metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from kappamask.bands import L2A_FEATURES, L2A_MAX_V
from kappamask.errors import InvalidInputError
from kappamask.inference.repository import (
    DEFAULT_REPOSITORY,
    PYTHON_MODEL_FILE,
    install_model,
    servable_models,
    spec_from_onnx,
)
from kappamask.model.architecture import conv_specs
from kappamask.model.onnx_graph import build_model, model_metadata


def _tiny_onnx(path: Path, metadata: dict[str, str] | None) -> Path:
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    weights = {
        s.name: (
            rng.normal(size=(s.out_channels, s.in_channels, s.kernel, s.kernel)).astype("float32"),
            np.zeros(s.out_channels, "float32"),
        )
        for s in conv_specs(13, 2)
    }
    onnx.save(build_model(weights, 13, 2, metadata), str(path))
    return path


def test_install_writes_cpu_and_gpu_configs(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / PYTHON_MODEL_FILE).write_text("# model")
    onnx_path = _tiny_onnx(
        tmp_path / "m.onnx", model_metadata("L2A", L2A_FEATURES, L2A_MAX_V, "v-test", "bootstrap")
    )
    model_dir = install_model(onnx_path, repo)
    assert model_dir == repo / "kappamask_l2a"
    cpu = (model_dir / "config.pbtxt").read_text()
    gpu = (model_dir / "configs" / "gpu.pbtxt").read_text()
    for text in (cpu, gpu):
        assert 'name: "input" data_type: TYPE_FP16 dims: [ 13, 512, 512 ]' in text
        assert 'name: "classes" data_type: TYPE_UINT8' in text
        assert "AOT,B01,B02,B03,B04,B05,B06,B08,B8A,B09,B11,B12,WVP" in text
        assert "v-test" in text and "dynamic_batching" in text
    assert 'backend: "python"' in cpu and 'platform: "tensorrt_plan"' in gpu
    assert (model_dir / "1" / "model.py").resolve() == (repo / PYTHON_MODEL_FILE).resolve()
    assert servable_models(repo) == ["kappamask_l2a"]


def test_model_without_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="metadata"):
        spec_from_onnx(_tiny_onnx(tmp_path / "m.onnx", None))


def test_shipped_repository_configs_agree_with_their_onnx() -> None:
    for name in servable_models(DEFAULT_REPOSITORY):
        spec = spec_from_onnx(next((DEFAULT_REPOSITORY / name).glob("[0-9]*/model.onnx")))
        config = (DEFAULT_REPOSITORY / name / "config.pbtxt").read_text()
        assert f'name: "{spec.name}"' in config
        assert ",".join(spec.features) in config
        assert spec.version_label in config
        # a randomly initialised network may serve plumbing tests only, never by default
        assert "random" not in spec.version_label
    assert (DEFAULT_REPOSITORY / "kappamask_l1c" / "config.pbtxt").exists()
