"""The U-Net, its ONNX export, the loss and a short real training run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="training extra not installed")

from kappamask.bands import L2A_FEATURES, L2A_MAX_V, MaskClass  # noqa: E402
from kappamask.inference.model_spec import decide  # noqa: E402
from kappamask.inference.repository import spec_from_onnx  # noqa: E402
from kappamask.tools.export import export_onnx  # noqa: E402
from kappamask.tools.labels import scl_to_mask  # noqa: E402
from kappamask.tools.losses import generalised_dice_loss, masked_bce  # noqa: E402
from kappamask.tools.metrics import agreement  # noqa: E402
from kappamask.tools.train import FitConfig, TrainConfig, train  # noqa: E402
from kappamask.tools.unet import UNet  # noqa: E402

from .conftest import T29UNU  # noqa: E402


def test_unet_shape_and_parameter_count() -> None:
    model = UNet(13, 32)
    assert sum(p.numel() for p in model.parameters()) == 7_763_540  # TRITON.md: 7.8 M
    with torch.no_grad():
        out = UNet(13, 4).eval()(torch.rand(1, 13, 64, 64))
    assert out.shape == (1, 6, 64, 64) and float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize(
    ("channels", "batch_norm", "head"), [(13, False, 2), (14, False, 2), (13, True, 16)]
)
def test_onnx_export_matches_torch(
    tmp_path: Path, channels: int, batch_norm: bool, head: int
) -> None:
    """Our exports (and the distilled models: batch norm folded, a 16-channel head) give
    the classes and confidence of the PyTorch network."""
    torch.manual_seed(channels)
    model = UNet(channels, 8, batch_norm=batch_norm, head_channels=head)
    if batch_norm:  # running statistics away from the identity: folding must carry them
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(4, channels, 64, 64) * 3)
        for norm in model.norms.values():
            torch.nn.init.uniform_(norm.weight, 0.5, 2.0)
            torch.nn.init.uniform_(norm.bias, -0.5, 0.5)
    model.eval()
    features = [f"F{i}" for i in range(channels)]
    path = export_onnx(model, "L2A", features, [0.25] * channels, "test", tmp_path / "m.onnx")
    x = torch.rand(2, channels, 96, 96) * 2
    with torch.no_grad():
        probs = model(x).numpy()
    classes, confidence, probability, scores = ort.InferenceSession(str(path)).run(
        None, {"input": x.numpy()}
    )
    real = probs[:, 1:5]  # every pixel has data: the best of CLEAR .. CLOUD wins
    expected = np.array([1, 2, 3, 4], dtype=np.uint8)[real.argmax(1)]
    top2 = np.sort(real, axis=1)[:, -2:]
    clear_winner = (top2[:, 1] - top2[:, 0]) > 1e-5  # exact ties may go either way
    assert (classes[clear_winner] == expected[clear_winner]).all()
    assert np.abs(confidence.astype(int) - np.round(real.max(1) * 255)).max() <= 1
    assert classes.dtype == np.uint8 and confidence.dtype == np.uint8
    # the cloud probability: strongest cloudy against strongest cloud-free sigmoid, in %
    cloudy, free = real[:, 2:4].max(1), real[:, 0:2].max(1)
    expected_p = np.round(100 * cloudy / (cloudy + free))
    # where every sigmoid of this untrained net is below 1e-6 the odds are rounding noise
    sure = (cloudy + free > 1e-6) & clear_winner
    assert sure.mean() > 0.9
    assert np.abs(probability.astype(int) - expected_p)[sure].max() <= 1
    # the scores the service blends: the four real sigmoids x 255; deciding one crop from
    # them (as the mosaic does where crops do not overlap) gives the graph's own answer
    assert scores.shape == (2, 4, 96, 96) and scores.dtype == np.uint8
    assert np.abs(scores.astype(int) - np.round(real * 255)).max() <= 1
    for i in range(2):
        decided = decide(scores[i])
        # uint8 scores tie where the sigmoids differ by less than 1/255: either may win
        distinct = np.sort(scores[i], axis=0)[-1] > np.sort(scores[i], axis=0)[-2]
        assert (decided[0] == classes[i])[distinct & clear_winner[i]].all()
        assert (decided[1] == confidence[i]).all()
        # the odds of uint8 scores are as good as their sum: compare where it is 64 or more
        odds_known = (cloudy[i] + free[i]) * 255 >= 64
        assert odds_known.mean() > 0.1
        assert np.abs(decided[2].astype(int) - probability[i])[odds_known].max() <= 2
    spec = spec_from_onnx(path)
    assert spec.features == tuple(features) and spec.version_label == "test"


def test_missing_means_no_data_and_undefined_never_wins(tmp_path: Path) -> None:
    model = UNet(2, 4).eval()
    with torch.no_grad():  # head output: UNDEFINED > MISSING > CLOUD > the rest
        head = model.layer("head.conv2")
        head.weight.zero_()
        head.bias.copy_(torch.tensor([9.0, -5.0, -5.0, -5.0, 1.0, 5.0]))
    path = export_onnx(model, "L2A", ["a", "b"], [1.0, 1.0], "t", tmp_path / "m.onnx")
    x = np.zeros((1, 2, 32, 32), np.float32)
    x[0, 0, :, 16:] = 0.5  # right half has data, left half is all zeros
    classes, confidence, probability, _scores = ort.InferenceSession(str(path)).run(
        None, {"input": x}
    )
    assert (classes[0, :, :16] == MaskClass.MISSING).all()
    assert (probability[0, :, :16] == 255).all()  # no data
    sigmoid = 1 / (1 + np.exp(-np.array([-5.0, -5.0, -5.0, 1.0])))  # clear, shadow, semi, cloud
    expected = 100 * sigmoid[3] / (sigmoid[3] + sigmoid[0])
    assert (probability[0, :, 16:] == round(expected)).all()
    assert (confidence[0, :, :16] == round(255 / (1 + np.exp(-5.0)))).all()
    assert (classes[0, :, 16:] == MaskClass.CLOUD).all()
    assert (confidence[0, :, 16:] == round(255 / (1 + np.exp(-1.0)))).all()


def test_generalised_dice_is_zero_for_perfect_and_ignores_undefined() -> None:
    labels = torch.tensor([[[1, 2], [4, 5]]])
    probs = torch.zeros(1, 6, 2, 2)
    for code, channel in ((1, 1), (2, 2), (4, 4)):
        probs[0, channel][labels[0] == code] = 1.0
    probs[0, 3][labels[0] == 5] = 1.0  # anything on an UNDEFINED pixel is free
    assert float(generalised_dice_loss(probs, labels)) == pytest.approx(0.0, abs=1e-5)
    wrong = probs.roll(1, dims=1)
    assert float(generalised_dice_loss(wrong, labels)) == pytest.approx(1.0, abs=1e-5)
    assert float(masked_bce(probs.clamp(0.0, 1.0), labels)) < 1e-4
    # a few MISSING pixels do not swamp the classes (the graph decides MISSING from input)
    with_missing = torch.tensor([[[1, 2, 0], [4, 5, 0]]])
    probs3 = torch.zeros(1, 6, 2, 3)
    probs3[:, :, :, :2] = probs
    probs3[0, 2, :, 2] = 1.0  # "shadow" on the no-data pixels costs nothing in the dice
    assert float(generalised_dice_loss(probs3, with_missing)) == pytest.approx(0.0, abs=1e-5)


def test_scl_mapping_of_table_1() -> None:
    scl = np.arange(12, dtype=np.uint8)
    assert scl_to_mask(scl).tolist() == [0, 0, 1, 2, 1, 1, 1, 5, 4, 4, 3, 1]


def test_agreement_by_hand() -> None:
    ref = np.array([1, 1, 2, 4, 4, 5, 0, 3], dtype=np.uint8)
    pred = np.array([1, 2, 2, 4, 3, 4, 4, 0], dtype=np.uint8)
    result = agreement(pred, ref)
    assert result["pixels"] == 6  # UNDEFINED and MISSING references left out
    assert result["overall_accuracy"] == pytest.approx(3 / 6)
    classes = result["classes"]
    # clear: tp 1, predicted 1, reference 2
    assert classes["clear"] == pytest.approx(
        {"dice": 2 / 3, "precision": 1.0, "recall": 0.5, "support": 2.0}
    )
    # shadow: tp 1, predicted 2, reference 1
    assert classes["cloud_shadow"]["dice"] == pytest.approx(2 / 3)
    assert classes["cloud_shadow"]["precision"] == pytest.approx(0.5)
    # semi-transparent: tp 0, predicted 1 (the cloud pixel), reference 1 (predicted missing)
    assert classes["semi_transparent_cloud"]["dice"] == 0.0
    assert classes["cloud"] == pytest.approx(
        {"dice": 2 / 3, "precision": 1.0, "recall": 0.5, "support": 2.0}
    )
    # rows: reference clear, shadow, semi, cloud; columns: predicted missing, clear .. cloud
    assert result["confusion"] == [
        [0, 1, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1],
    ]
    # clear+shadow vs semi+cloud: clear row 3 clear / 0 cloud; cloud row 1 (missing) + 1
    # clear / 2 cloud
    two = result["two_class"]
    assert two["confusion"] == [[3, 0], [1, 2]]
    assert two["overall_accuracy"] == pytest.approx(5 / 6)
    assert two["classes"]["cloud"]["recall"] == pytest.approx(2 / 3)
    assert two["classes"]["cloud"]["precision"] == pytest.approx(1.0)
    assert two["classes"]["clear"]["dice"] == pytest.approx(2 * 3 / (4 + 3))


def test_short_training_run_resumes_and_exports(tmp_path: Path) -> None:
    config = TrainConfig(
        product=str(T29UNU),
        base_filters=4,
        fit=FitConfig(crop=64, batch_size=2, steps_per_epoch=3, max_epochs=1, loss="gdl+bce"),
    )
    model, holdout = train(config, tmp_path)
    assert (tmp_path / "checkpoint.pt").exists()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0
    assert np.isfinite(float(rows[0]["dice_cloud"]))  # the validation crops had cloud
    # the held-out figures add up: accuracy = correct pixels (recall x support) / pixels
    scl = holdout["scl"]
    correct = sum(c["recall"] * c["support"] for c in scl["classes"].values() if c["support"])
    assert scl["pixels"] > 1000
    assert scl["overall_accuracy"] == pytest.approx(correct / scl["pixels"])
    assert json.loads((tmp_path / "holdout.json").read_text()) == holdout
    # a second call resumes after the saved epoch
    config.fit.max_epochs = 2
    train(config, tmp_path)
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))) == 2
    path = export_onnx(model, "L2A", L2A_FEATURES, L2A_MAX_V, "tiny", tmp_path / "model.onnx")
    assert spec_from_onnx(path).level == "L2A"


def test_seams_find_a_cut_and_ignore_a_seamless_raster() -> None:
    """Blobs of classes everywhere: every boundary changes about as often as the median.
    Cut at row 300 and column 200 (the lower part taken from elsewhere, as a crop that
    disagrees with its neighbour): those boundaries stand out, and are named."""
    from scipy.ndimage import zoom

    from kappamask.tools.metrics import seams

    rng = np.random.default_rng(0)
    field = zoom(rng.random((40, 40)), 16, order=3)  # 640 px of smooth relief
    blobs = (1 + np.digitize(field, [0.35, 0.5, 0.65])).astype(np.uint8)  # classes 1..4
    smooth = seams(blobs[:600, :600], [300], [200])
    for axis in ("rows", "columns"):
        assert smooth[axis]["worst_crop_ratio"] < 2.5
    cut = blobs[:600, :600].copy()
    cut[300:] = blobs[308:608, :600]  # a seam: the rows below come from 8 px lower
    cut[:, 200:] = np.roll(cut[:, 200:], 7, axis=1)
    report = seams(cut, [300], [200])
    assert report["rows"]["worst_crop_ratio"] > 2.5 and report["rows"]["worst_boundary"] == 300
    assert report["columns"]["worst_crop_ratio"] > 2.5
    # no data is left out: a raster half MISSING has the same median
    half = cut.copy()
    half[:, :100] = MaskClass.MISSING
    assert seams(half, [300], [200])["rows"]["worst_boundary"] == 300


def test_trust_counts_by_hand() -> None:
    from kappamask.tools.metrics import TrustCounts

    c = MaskClass
    pred = np.array([c.CLEAR, c.CLOUD_SHADOW, c.CLOUD, c.CLEAR, c.MISSING], np.uint8)
    s2c = np.array([c.CLEAR, c.CLEAR, c.CLOUD, c.CLOUD, c.CLEAR], np.uint8)
    ukis = np.array([c.CLEAR, c.CLEAR, c.CLOUD, c.CLOUD_SHADOW, c.CLEAR], np.uint8)
    counts = TrustCounts()
    counts.add(pred, {"s2cloudless": s2c, "ukis-csmask": ukis})
    report = counts.report()
    assert report["pixels"] == 4 and report["shadow_share"] == 0.25
    assert report["both_teachers_clear"] == {"pixels": 2, "stay_clear": 0.5, "become_shadow": 0.5}
    assert report["s2cloudless"]["cloud_dice"] == pytest.approx(2 / 3)  # 1 of 1 vs 2
    assert report["ukis-csmask"]["cloud_dice"] == 1.0
    assert report["ukis-csmask"]["shadow_recall"] == 0.0
