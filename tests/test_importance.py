"""Permutation feature importance (the paper's §3.3, Figure 11) on the served L1C model and
a real SEN12MS-CR cumulus patch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V
from kappamask.cli import main
from kappamask.errors import InvalidInputError
from kappamask.inference.repository import DEFAULT_REPOSITORY
from kappamask.tools import importance as fi
from kappamask.tools import realdata
from kappamask.tools.distill import save_scene

MODEL = DEFAULT_REPOSITORY / "kappamask_l1c" / "1" / "model.onnx"
PATCH = Path(__file__).parent / "data" / "sen12mscr" / "ROIs1970_fall_s2_cloudy_136_p139.tif"


@pytest.fixture(scope="module")
def tile() -> fi.LabelledTile:
    """The real patch, labelled with the served model's own answer: every error then comes
    from the zeroed feature alone."""
    features = realdata.features(realdata.read_multiband(PATCH), "L1C")
    labels = fi.OnnxClassifier(MODEL)(features)
    return fi.LabelledTile(
        "p139", features, labels, tuple(DEFAULT_FEATURES["L1C"]), tuple(DEFAULT_MAX_V["L1C"])
    )


def test_features_are_brought_to_the_model_s_order_and_scale(tile: fi.LabelledTile) -> None:
    names = tile.names[::-1]
    halved = fi.LabelledTile(
        "r", tile.features[::-1] * 2, tile.labels, names, tuple(v / 2 for v in tile.max_v[::-1])
    )
    assert np.allclose(fi.adapt(halved, tile.names, tile.max_v), tile.features, atol=1e-6)
    with pytest.raises(InvalidInputError, match="has no AOT"):
        fi.adapt(tile, ("AOT", *tile.names[1:]), tile.max_v)


def test_zeroing_a_feature_costs_what_the_model_leans_on(tile: fi.LabelledTile) -> None:
    classify = fi.OnnxClassifier(MODEL)
    result = fi.feature_importance([tile], classify, fi.HUMAN_LABELS)
    assert result["baseline"]["sum"] == pytest.approx(0.0, abs=1e-9)  # its own labels
    rows = result["features"]
    assert [r["feature"] for r in rows] != list(DEFAULT_FEATURES["L1C"])  # ranked
    assert {r["feature"] for r in rows} == set(DEFAULT_FEATURES["L1C"])
    sums = [r["sum"] for r in rows]
    assert sums == sorted(sums, reverse=True) and sums[0] > 0.5
    assert all(r["increase"] == pytest.approx(r["sum"]) for r in rows)
    table = fi.format_importance(result)
    assert "labels: human labels" in table and rows[0]["feature"] in table.splitlines()[4]


def test_the_command_reports_teacher_labels_as_such(tile: fi.LabelledTile, tmp_path: Path) -> None:
    cache = tmp_path / "labels"
    cache.mkdir()
    save_scene(
        realdata.Labelled("p139", "g", "L1C", tile.features, tile.labels, {}),
        cache / "L1C_p139.npz",
    )
    args = [
        "evaluate",
        "--feature-importance",
        "--model",
        str(MODEL),
        "--labels-cache",
        str(cache),
        "--json",
        str(tmp_path / "fi.json"),
        "--png",
        str(tmp_path / "fi.png"),
    ]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "teachers' fused labels" in done.output
    report = json.loads((tmp_path / "fi.json").read_text())
    assert report["labels"] == fi.TEACHER_LABELS and report["scenes"] == 1
    assert (tmp_path / "fi.png").stat().st_size > 10_000
    refused = CliRunner().invoke(main, ["evaluate", "--feature-importance", "--model", str(MODEL)])
    assert refused.exit_code != 0 and "--kappaset" in refused.output
