"""INT8 variant of the shipped L2A model: calibrated and checked on real crops, refused
below 99.5 % agreement, served by a real Triton through the same Python backend."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
from click.testing import CliRunner

from kappamask.cli import main
from kappamask.inference.repository import (
    DEFAULT_REPOSITORY,
    FP32_FILE,
    INT8_FILE,
    PYTHON_MODEL_FILE,
    install_model,
    spec_from_onnx,
)
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import run
from kappamask.tools import quantize as q

from .conftest import T29UNU, use_settings

FP32_L2A = DEFAULT_REPOSITORY / "kappamask_l2a" / "1" / FP32_FILE


@pytest.fixture(scope="module")
def int8_l2a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, q.QuantizeReport]:
    out = tmp_path_factory.mktemp("int8") / INT8_FILE
    spec = spec_from_onnx(FP32_L2A)
    report = q.quantize_and_check(
        FP32_L2A, out, [T29UNU], 20, spec.features, spec.max_v, max_crops=16, timing_repeats=1
    )
    return out, report


@pytest.mark.slow
def test_int8_is_accepted_only_with_agreement(int8_l2a: tuple[Path, q.QuantizeReport]) -> None:
    path, report = int8_l2a
    assert report.accepted and report.agreement >= q.MIN_AGREEMENT
    # 16 crops with data (the 4 x 4 grid centred on the 1632 px window: each reaches data),
    # and each once more under synthetic clouds
    assert report.calibration_crops == report.check_crops == 16
    assert report.pixels > 2_000_000  # data pixels of the held-out crops, not padding
    assert report.fp32_layers in q.FP32_LADDER
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["kappamask.precision"] == "int8"
    assert spec_from_onnx(path) == spec_from_onnx(FP32_L2A)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the layers the ladder kept in FP32 read an FP32 weight; every other conv a QDQ one
    weights = {i.name for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "Conv"):
        fp32 = node.input[1] in weights
        kept = any(node.input[1].startswith(prefix) for prefix in report.fp32_layers)
        assert fp32 == kept, node.input[1]


@pytest.mark.slow
def test_int8_below_the_bar_is_refused_and_not_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the cheapest variant only, and a bar no variant can reach (agreement is at most 1):
    # the refusal must not depend on how well the served weights happen to quantise
    monkeypatch.setattr(q, "FP32_LADDER", q.FP32_LADDER[:1])
    monkeypatch.setattr(q, "MIN_AGREEMENT", 1.01)
    out = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(FP32_L2A),
            "--product",
            str(T29UNU),
            "--resolution",
            "20",
            "--out",
            str(out),
            "--max-crops",
            "8",
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "INT8 variant refused" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "r.json"]


@pytest.mark.slow
def test_served_int8_gives_the_fp32_mask(
    int8_l2a: tuple[Path, q.QuantizeReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(DEFAULT_REPOSITORY / PYTHON_MODEL_FILE, repo / PYTHON_MODEL_FILE)
    model_dir = install_model(FP32_L2A, repo, int8_path=int8_l2a[0])
    int8_param = 'key: "int8_file" value: { string_value: "model.int8.onnx" }'
    assert int8_param in (model_dir / "config.pbtxt").read_text()
    assert "int8" not in (model_dir / "configs" / "gpu.pbtxt").read_text()
    masks = []
    for precision in ("f32", "int8"):  # what a CPU without bfloat16 serves: the INT8 file
        use_settings(monkeypatch, cpu_precision=precision)
        with LocalTriton(repo, supervise=False) as server, TritonClient(server.http_url) as client:
            assert f", {precision}, " in server.log_tail(200)
            result = run(T29UNU, tmp_path / precision, client, RunOptions(resolution=60))
            with rasterio.open(result.mask) as src:
                masks.append(src.read(1))
    fp32, int8 = masks
    has_data = fp32 != 0
    assert ((int8 == 0) == ~has_data).all()
    assert (fp32 == int8)[has_data].mean() >= q.MIN_AGREEMENT
    # installing weights without an INT8 file drops the stale one
    install_model(FP32_L2A, repo)
    assert not (model_dir / "1" / INT8_FILE).exists()
    assert int8_param not in (model_dir / "config.pbtxt").read_text()


def test_compare_counts_only_pixels_with_data() -> None:
    """On the served INT8 file: agreement over the 5000 pixels with data, counted here
    with ONNX Runtime (the no-data rest agrees trivially and must not dilute it)."""
    import onnxruntime as ort

    int8 = FP32_L2A.with_name("model.int8.onnx")
    crop = np.zeros((13, 512, 512), np.float32)
    crop[:, :100, :50] = np.random.default_rng(3).uniform(0.05, 0.6, (13, 100, 50))
    pixels, agreement, _t32, _t8 = q.compare(FP32_L2A, int8, [crop], timing_repeats=1)
    a, b = (
        ort.InferenceSession(str(m)).run(["classes"], {"input": crop[None]})[0][0, :100, :50]
        for m in (FP32_L2A, int8)
    )
    assert pixels == 100 * 50
    assert agreement == pytest.approx((a == b).mean())
