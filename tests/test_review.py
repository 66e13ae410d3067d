"""`kappamask review`: the served model over a real product, its sub-tiles ranked by how
unsure it is, with what a labeller needs for each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from kappamask.bands import DEFAULT_FEATURES, MaskClass
from kappamask.inference.server import LocalTriton
from kappamask.tools.review import LOW_CONFIDENCE, uncertainty

from .conftest import T29UNU


def test_uncertainty_is_the_top_two_margin_over_the_pixels_with_data() -> None:
    scores = np.zeros((4, 2, 2), np.uint8)
    scores[0] = [[255, 128], [255, 0]]  # clear
    scores[3] = [[0, 102], [0, 255]]  # cloud
    valid = np.array([[True, True], [True, False]])
    unsure, margin, low = uncertainty(scores, valid)
    margins = [1.0, (128 - 102) / 255, 1.0]
    assert margin == pytest.approx(np.mean(margins))
    assert unsure == pytest.approx(1 - np.mean(margins))
    assert low == pytest.approx(1 / 3) and LOW_CONFIDENCE > 128 / 255
    assert uncertainty(scores, np.zeros_like(valid)) == (0.0, 1.0, 0.0)


@pytest.mark.slow
def test_review_ranks_the_sub_tiles_of_a_real_product(triton: LocalTriton, tmp_path: Path) -> None:
    out = tmp_path / "review"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kappamask.cli",
            "review",
            str(T29UNU),
            "--out",
            str(out),
            "--resolution",
            "20",
            "--top",
            "3",
            "--triton-url",
            triton.http_url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "3 sub-tiles ranked" in done.stdout
    index = json.loads((out / "index.json").read_text())
    tiles = index["sub_tiles"]
    assert [t["rank"] for t in tiles] == [1, 2, 3]
    assert [t["unsure"] for t in tiles] == sorted((t["unsure"] for t in tiles), reverse=True)
    assert index["model"].startswith("kappamask_l2a ")
    # only the kept sub-tiles' files remain: four each
    assert len(list((out / "tiles").iterdir())) == 4 * len(tiles)
    first = tiles[0]
    with rasterio.open(out / first["files"]["bands"]) as bands:
        assert bands.count == len(DEFAULT_FEATURES["L2A"])
        assert bands.descriptions == tuple(DEFAULT_FEATURES["L2A"])
        assert bands.crs.to_epsg() == 32629 and bands.res == (20.0, 20.0)
        with rasterio.open(out / first["files"]["mask"]) as mask:
            assert (mask.transform, mask.shape) == (bands.transform, bands.shape)
            classes = mask.read(1)
    _col, _row, width, height = first["window"]
    assert (height, width) == classes.shape
    present = set(np.unique(classes)) - {MaskClass.MISSING}
    assert present and present <= {1, 2, 3, 4}
    assert sum(first["classes"].values()) == pytest.approx(1.0)
    sheet = (out / "index.html").read_text()
    for t in tiles:
        assert t["files"]["overlay"] in sheet and (out / t["files"]["rgb"]).stat().st_size > 1000
