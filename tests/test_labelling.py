"""The paper's loop after `kappamask review`: sub-tiles to a labelling tool with the model's
mask as a pre-annotation, people's corrections back as label rasters, fine-tuning on them
and the fine-tuned model served with its lineage. Against a real Label Studio server and
real datumaro (their own environments: tests/side_envs.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import requests
from affine import Affine

from kappamask.bands import CLASS_NAMES, OUTPUT_CLASSES, MaskClass
from kappamask.errors import InvalidInputError
from kappamask.inference.server import LocalTriton, free_port
from kappamask.tools.labelling import cvat, rle
from kappamask.tools.labelling.labelstudio import (
    brush_results,
    label_config,
    rasterise,
)
from kappamask.tools.labelling.subtiles import ReviewFolder, read_labels
from kappamask.writers.preview import write_png

from .conftest import DATA, T29UNU
from .processes import stop
from .side_envs import side_env

LEGACY_TOKEN = "kappamask0123456789abcdef0123456789abcd"
SEN12MSCR = DATA / "sen12mscr"


def _bits(text: str) -> list[int]:
    text += "0" * (-len(text) % 8)
    return [int(text[i : i + 8], 2) for i in range(0, len(text), 8)]


def test_brush_rle_matches_label_studio_bytes() -> None:
    # Label Studio's own converter (label_studio_sdk.converter.brush.mask2rle) encodes
    # [[0, 255, 255], [0, 0, 255]] as these bytes
    known = [0, 0, 0, 24, 57, 27, 252, 96, 19, 255, 206, 1, 31, 248]
    mask = np.array([[False, True, True], [False, False, True]])
    assert rle.encode(mask) == known
    assert (rle.decode(known, 3, 2) == mask).all()


def test_brush_rle_round_trips_and_reads_literal_chunks() -> None:
    rng = np.random.default_rng(3)
    for shape in [(512, 512), (37, 91), (1, 1), (300, 17)]:
        mask = rng.random(shape) < 0.4
        mask[: shape[0] // 2] = True  # a run longer than 2^16 bytes too
        assert (rle.decode(rle.encode(mask), shape[1], shape[0]) == mask).all()
    # the editor may write literal chunks: flag 0, size 0, 8 words (two RGBA pixels)
    header = f"{8:032b}{7:05b}" + "".join(f"{b - 1:04b}" for b in (3, 4, 8, 16))
    literal = "0" + "00" + f"{7:03b}" + "".join(f"{v:08b}" for v in [0, 0, 0, 0] + [9] * 3 + [200])
    assert rle.decode(_bits(header + literal), 2, 1).tolist() == [[False, True]]
    with pytest.raises(InvalidInputError, match="not 4 x 4 RGBA"):
        rle.decode(rle.encode(np.ones((2, 2), bool)), 4, 4)
    with pytest.raises(InvalidInputError, match="ends in the middle"):
        rle.decode(_bits(header + "1"), 2, 1)


def test_label_config_offers_the_five_classes() -> None:
    root = ET.fromstring(label_config())
    labels = [e.get("value") for e in root.iter("Label")]
    assert sorted(labels) == sorted(CLASS_NAMES[c] for c in OUTPUT_CLASSES)
    assert [e.get("hotkey") for e in root.iter("Label")] == ["1", "2", "3", "4", "5"]
    assert root.find("BrushLabels").get("toName") == root.find("Image").get("name")  # type: ignore[union-attr]


def test_rasterise_paints_later_strokes_over_earlier_ones() -> None:
    cloud = np.zeros((4, 5), np.uint8)
    cloud[:2] = MaskClass.CLOUD
    results = brush_results(cloud)  # one cloud layer (0 is MISSING: its own layer)
    shadow = np.full((4, 5), int(MaskClass.UNDEFINED), np.uint8)
    shadow[1:3, 1:3] = MaskClass.CLOUD_SHADOW
    results += brush_results(shadow, origin="manual")
    labels = rasterise(results, (4, 5))
    expected = cloud.copy()
    expected[1:3, 1:3] = MaskClass.CLOUD_SHADOW
    assert (labels == expected).all()
    assert (rasterise([], (4, 5)) == MaskClass.UNDEFINED).all()
    wrong = {**results[0], "value": {**results[0]["value"], "brushlabels": ["tree"]}}
    with pytest.raises(InvalidInputError, match="'tree' is not a KappaMask class"):
        rasterise([wrong], (4, 5))
    with pytest.raises(InvalidInputError, match="drawn on 5 x 4 px"):
        rasterise(results, (8, 8))
    with pytest.raises(InvalidInputError, match="only the 'mask' brush"):
        rasterise([{**results[0], "type": "rectanglelabels"}], (4, 5))


def make_review(root: Path, shapes: list[tuple[int, int]], seed: int = 0) -> ReviewFolder:
    """A review folder as `kappamask review` writes it, of synthetic sub-tiles (a UTM grid,
    three named features, a mask of every class)."""
    rng = np.random.default_rng(seed)
    (root / "tiles").mkdir(parents=True)
    entries = []
    for i, (h, w) in enumerate(shapes):
        name = f"S2X_MSIL2A_TEST_r{i:02d}_c00"
        profile = {
            "driver": "GTiff",
            "width": w,
            "height": h,
            "crs": "EPSG:32629",
            "transform": Affine(10, 0, 500000, 0, -10, 6000000 - i * 5120),
        }
        files = {
            k: f"tiles/{name}_{k}.{'png' if k in ('rgb', 'overlay') else 'tif'}"
            for k in ("bands", "mask", "rgb", "overlay")
        }
        with rasterio.open(root / files["bands"], "w", **profile, count=3, dtype="float32") as dst:
            dst.write(rng.random((3, h, w), np.float32))
            dst.descriptions = ("B02", "B03", "B04")
            dst.update_tags(level="L2A")
        mask = rng.integers(0, 5, (h, w)).astype(np.uint8)
        with rasterio.open(root / files["mask"], "w", **profile, count=1, dtype="uint8") as dst:
            dst.write(mask[None])
        rgb = rng.integers(0, 255, (4, h, w)).astype(np.uint8)
        write_png(rgb, root / files["rgb"])
        write_png(rgb, root / files["overlay"])
        entries.append(
            {
                "rank": i + 1,
                "name": name,
                "product_id": "S2X_MSIL2A_TEST",
                "unsure": 0.5 - i / 100,
                "files": files,
            }
        )
    (root / "index.json").write_text(
        json.dumps({"model": "kappamask_l2a test", "sub_tiles": entries})
    )
    return ReviewFolder(root)


def test_label_rasters_are_georeferenced_and_refuse_what_does_not_fit(tmp_path: Path) -> None:
    folder = make_review(tmp_path / "review", [(20, 30)])
    tile = folder.tiles[0]
    labels = np.full((20, 30), int(MaskClass.UNDEFINED), np.uint8)
    labels[5:10] = MaskClass.CLOUD
    path = folder.write_labels(tile.name, labels, {"source": "test"})
    read, tags = read_labels(path)
    assert (read == labels).all() and tags["source"] == "test"
    with rasterio.open(path) as out, rasterio.open(tile.bands) as bands:
        assert (out.crs, out.transform) == (bands.crs, bands.transform)
    with pytest.raises(InvalidInputError, match="labels of 31 x 20 px for a sub-tile of 30 x 20"):
        folder.write_labels(tile.name, np.zeros((20, 31), np.uint8), {})
    with pytest.raises(InvalidInputError, match=r"\[7\] are not mask codes"):
        folder.write_labels(tile.name, np.full((20, 30), 7, np.uint8), {})
    with pytest.raises(InvalidInputError, match="is not a sub-tile"):
        folder.tile("nope")
    with pytest.raises(InvalidInputError, match=r"holds no index\.json"):
        ReviewFolder(tmp_path)
    # an index is a file anyone may hand over: its names stay inside the review folder
    index = json.loads((folder.root / "index.json").read_text())
    for field, value, message in (
        ("files", "../../elsewhere.tif", "outside the review folder"),
        ("name", "../x", "is not a sub-tile name"),
    ):
        entry = dict(index["sub_tiles"][0])
        entry[field] = {**entry["files"], "bands": value} if field == "files" else value
        odd = tmp_path / f"odd-{field}"
        odd.mkdir()
        (odd / "index.json").write_text(json.dumps({"sub_tiles": [entry]}))
        with pytest.raises(InvalidInputError, match=message):
            ReviewFolder(odd)
    assert folder.level() == "L2A"


def test_cvat_dataset_round_trips_through_its_own_format(tmp_path: Path) -> None:
    folder = make_review(tmp_path / "review", [(40, 50), (64, 64)])
    first, second = folder.tiles
    labelled = np.full((40, 50), int(MaskClass.UNDEFINED), np.uint8)
    labelled[:10] = MaskClass.CLEAR
    folder.write_labels(first.name, labelled, {"source": "test"})
    dataset = cvat.export_dataset(folder, tmp_path / "cvat.zip")
    # a CVAT user corrects the second mask: the left half is cloud shadow
    with cvat._opened(dataset) as root:
        edited = tmp_path / "edited"
        shutil.copytree(root, edited)
    corrected = second.read_mask().copy()
    corrected[:, :32] = MaskClass.CLOUD_SHADOW
    write_png(cvat.colour_image(corrected), edited / cvat.CLASS_DIR / f"{second.name}.png")
    written = cvat.import_dataset(folder, edited)
    assert len(written) == 2
    assert (read_labels(folder.label_path(first.name))[0] == labelled).all()
    assert (read_labels(folder.label_path(second.name))[0] == corrected).all()
    assert (edited / cvat.IMAGE_DIR / f"{second.name}.png").exists()
    (edited / cvat.CLASS_DIR / "elsewhere.png").write_bytes(
        (edited / cvat.CLASS_DIR / f"{second.name}.png").read_bytes()
    )
    with pytest.raises(InvalidInputError, match="elsewhere is not a sub-tile"):
        cvat.import_dataset(folder, edited)
    (edited / cvat.LABELMAP).write_text("background:0,0,0::\ntree:1,2,3::\n")
    with pytest.raises(InvalidInputError, match="'tree' is not a KappaMask class"):
        cvat.import_dataset(folder, edited)


def test_fine_tuning_reads_the_exported_weights_back(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from kappamask.inference.model_spec import ORIGIN_FINE_TUNED
    from kappamask.inference.repository import spec_from_onnx
    from kappamask.tools.export import export_onnx
    from kappamask.tools.labelling.finetune import unet_from_onnx
    from kappamask.tools.unet import UNet

    torch.manual_seed(0)
    model = UNet(3, 4, batch_norm=True)
    model.eval()
    path = export_onnx(
        model,
        "L2A",
        ("B02", "B03", "B04"),
        (1.0, 1.0, 1.0),
        "test",
        tmp_path / "model.onnx",
        ORIGIN_FINE_TUNED,
        {"kappamask.parent_sha256": "ab" * 32},
    )
    loaded, spec = unet_from_onnx(path)
    assert (spec.origin, spec.parent_sha256) == (ORIGIN_FINE_TUNED, "ab" * 32)
    assert spec_from_onnx(path).provenance()["parent_sha256"] == "ab" * 32
    x = torch.rand(1, 3, 64, 64)
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-4)


def _split_names(count: int, holdout: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    from kappamask.tools.importance import LabelledTile
    from kappamask.tools.labelling.finetune import split

    tiles = [
        LabelledTile(f"t{i}", np.zeros((1, 2, 2)), np.zeros((2, 2)), ("B02",), (1.0,))
        for i in range(count)
    ]
    train, held = split(tiles, holdout)
    return [t.name for t in train], [t.name for t in held]


def test_held_out_sub_tiles_are_kept_out_of_training() -> None:
    assert _split_names(2) == (["t0"], ["t1"])
    assert _split_names(8)[1] == ["t1", "t6"]
    assert _split_names(3, ("t0",)) == (["t1", "t2"], ["t0"])
    with pytest.raises(InvalidInputError, match="both parts need one"):
        _split_names(2, ("t",))


# --- against the real servers ---------------------------------------------------------


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Label Studio (`label-studio start`) with a user whose legacy token is
    LEGACY_TOKEN; its URL."""
    binary = side_env("label-studio") / "label-studio"
    data = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LABEL_STUDIO_USERNAME": "labeller@example.org",
        "LABEL_STUDIO_PASSWORD": "kappamask-labeller",
        "LABEL_STUDIO_USER_TOKEN": LEGACY_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    }
    log = data / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(binary), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                pytest.fail("label-studio did not start:\n" + log.read_text()[-3000:])
            subprocess.run(["sleep", "0.5"], check=True)
        else:
            pytest.fail("label-studio did not answer /health:\n" + log.read_text()[-3000:])
        yield url
    finally:
        stop(proc)


def _kappamask(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kappamask.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _scl_labels(review: Path) -> dict[str, np.ndarray]:
    """Sen2Cor's classes of every reviewed sub-tile (Table 1): the stand-in for a person's
    corrections, which do not exist here."""
    from kappamask.geometry.grid import output_grid
    from kappamask.sources import open_safe
    from kappamask.tools.labels import read_scl_labels

    product = open_safe(T29UNU)
    scl = read_scl_labels(product, output_grid(product, 20))
    found = {}
    for entry in json.loads((review / "index.json").read_text())["sub_tiles"]:
        col, row, width, height = entry["window"]
        found[entry["name"]] = scl[row : row + height, col : col + width]
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_review_label_pull_fine_tune_and_serve(
    triton: LocalTriton, label_studio: str, tmp_path: Path
) -> None:
    review = tmp_path / "review"
    _kappamask(
        "review",
        str(T29UNU),
        "--out",
        str(review),
        "--resolution",
        "20",
        "--top",
        "4",
        "--triton-url",
        triton.http_url,
    )
    folder = ReviewFolder(review)
    legacy = {"Authorization": f"Token {LEGACY_TOKEN}"}
    # a personal access token, as a user copies it from Label Studio's account page
    pat = requests.post(f"{label_studio}/api/token/", headers=legacy, timeout=30).json()["token"]
    pushed = _kappamask(
        "label", "push", str(review), "--url", label_studio, env={"LABEL_STUDIO_API_KEY": pat}
    )
    project = json.loads((review / "labelstudio.json").read_text())["project"]
    assert f"4 tasks in project {project}: {label_studio}/projects/{project}/data" in pushed
    tasks = requests.get(
        f"{label_studio}/api/tasks",
        headers=legacy,
        timeout=30,
        params={"project": project, "fields": "all"},
    ).json()["tasks"]
    assert len(tasks) == 4
    by_name = {t["data"]["sub_tile"]: t for t in tasks}
    scl = _scl_labels(review)
    for tile in folder.tiles:
        task = by_name[tile.name]
        # the pre-annotation is the model's mask, pixel for pixel
        predictions = requests.get(
            f"{label_studio}/api/predictions",
            headers=legacy,
            params={"task": task["id"]},
            timeout=30,
        ).json()
        assert len(predictions) == 1 and predictions[0]["model_version"] == folder.model
        assert (rasterise(predictions[0]["result"], tile.shape) == tile.read_mask()).all()
        # and Label Studio serves the image it is drawn over
        image = requests.get(label_studio + task["data"]["image"], headers=legacy, timeout=30)
        assert image.status_code == 200 and image.content == tile.rgb.read_bytes()
    # a labeller corrects three sub-tiles to Sen2Cor's classes and skips the fourth
    corrected = [t.name for t in folder.tiles[:3]]
    for name in corrected:
        answer = requests.post(
            f"{label_studio}/api/tasks/{by_name[name]['id']}/annotations",
            headers=legacy,
            timeout=60,
            json={"result": brush_results(scl[name], origin="manual"), "lead_time": 42.0},
        )
        assert answer.status_code == 201, answer.text
    skipped = by_name[folder.tiles[3].name]["id"]
    requests.post(
        f"{label_studio}/api/tasks/{skipped}/annotations",
        headers=legacy,
        timeout=60,
        json={"result": [], "was_cancelled": True},
    ).raise_for_status()
    pulled = _kappamask("label", "pull", str(review), env={"LABEL_STUDIO_API_KEY": pat})
    assert "3 labelled sub-tile(s)" in pulled
    assert [t.name for t, _p in folder.labelled()] == corrected
    for name in corrected:
        labels, tags = read_labels(folder.label_path(name))
        assert (labels == scl[name]).all()
        assert tags["source"] == "label-studio" and tags["project"] == str(project)
    # fine-tune the served L2A model on two of them, the third kept out
    parent = triton.repository / "kappamask_l2a" / "1" / "model.onnx"
    out = tmp_path / "fine-tuned"
    trained = _kappamask(
        "train",
        "--labels",
        f"labelled:{review}",
        "--parent",
        str(parent),
        "--holdout",
        corrected[1][-7:],
        "--epochs",
        "2",
        "--steps-per-epoch",
        "4",
        "--out",
        str(out),
    )
    assert "held_out:" in trained and "train:" in trained
    report = json.loads((out / "holdout.json").read_text())
    assert report["held_out"] == [corrected[1]] and report["parent"]["sha256"] == _sha256(parent)
    assert report["before"]["train"]["overall_accuracy"] < 1.0
    assert {"before", "after", "unlabelled_changed"} <= set(report)
    # installed as a new version with its lineage, and served
    repository = tmp_path / "repository"
    shutil.copytree(triton.repository, repository, symlinks=True)
    _kappamask("install-model", str(out / "model.onnx"), "--repository", str(repository))
    with LocalTriton(repository) as served:
        again = tmp_path / "again"
        _kappamask(
            "review",
            str(T29UNU),
            "--out",
            str(again),
            "--resolution",
            "20",
            "--triton-url",
            served.http_url,
        )
        result = tmp_path / "result"
        _kappamask(
            "run",
            str(T29UNU),
            "--out",
            str(result),
            "--resolution",
            "20",
            "--triton-url",
            served.http_url,
        )
    item = json.loads(next(result.glob("*_KAPPAMASK.json")).read_text())
    lineage: dict[str, Any] = item["properties"]["kappamask:model"]
    assert lineage["origin"] == "fine-tuned" and lineage["parent_sha256"] == _sha256(parent)
    # the sub-tiles the labeller corrected changed under the fine-tuned model
    new = ReviewFolder(again)
    changed = [(new.tile(n).read_mask() != folder.tile(n).read_mask()).mean() for n in corrected]
    assert max(changed) > 0.001, changed


@pytest.mark.slow
def test_cvat_dataset_is_read_and_written_by_datumaro(tmp_path: Path) -> None:
    folder = make_review(tmp_path / "review", [(48, 64), (64, 64)])
    first, second = folder.tiles
    labels = first.read_mask().copy()
    labels[:8] = MaskClass.UNDEFINED  # not labelled: background
    folder.write_labels(first.name, labels, {"source": "test"})
    dataset = cvat.export_dataset(folder, tmp_path / "cvat")
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, json, numpy as np\n"
        "import datumaro as dm\n"
        "ds = dm.Dataset.import_from(sys.argv[1], 'voc_segmentation')\n"
        "names = [c.name for c in ds.categories()[dm.AnnotationType.label]]\n"
        "out = {'labels': names, 'items': {}}\n"
        "for item in ds:\n"
        "    h, w = item.media.data.shape[:2]\n"
        "    codes = np.full((h, w), -1)\n"
        "    for a in item.annotations:\n"
        "        if a.type == dm.AnnotationType.mask:\n"
        "            codes[a.image.astype(bool)] = a.label\n"
        "    out['items'][item.id] = codes.tolist()\n"
        "json.dump(out, open(sys.argv[2], 'w'))\n"
        "ds.export(sys.argv[3], 'voc_segmentation', save_media=True, apply_colormap=True,\n"
        "          label_map=sys.argv[1] + '/labelmap.txt')\n"
    )
    python = side_env("datumaro") / "python"
    done = subprocess.run(
        [
            str(python),
            str(script),
            str(dataset),
            str(tmp_path / "read.json"),
            str(tmp_path / "by-datumaro"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads((tmp_path / "read.json").read_text())
    names = read["labels"]
    assert names[0] == cvat.BACKGROUND and set(names[1:]) == {
        CLASS_NAMES[c] for c in OUTPUT_CLASSES
    }
    code_of = {
        i: (
            int(MaskClass.UNDEFINED)
            if n == cvat.BACKGROUND
            else next(int(c) for c in OUTPUT_CLASSES if CLASS_NAMES[c] == n)
        )
        for i, n in enumerate(names)
    }
    for tile, expected in ((first, labels), (second, second.read_mask())):
        codes = np.vectorize(code_of.get)(np.array(read["items"][tile.name]))
        assert (codes == expected).all()
    # what datumaro writes (as CVAT's exporter does) comes back as label rasters
    for path in folder.labelled():
        path[1].unlink()
    written = cvat.import_dataset(folder, tmp_path / "by-datumaro")
    assert len(written) == 2
    assert (read_labels(folder.label_path(first.name))[0] == labels).all()
    assert (read_labels(folder.label_path(second.name))[0] == second.read_mask()).all()


@pytest.mark.slow
def test_real_scenes_are_reviewed_labelled_and_fine_tuned(tmp_path: Path) -> None:
    """The L1C loop on real SEN12MS-CR patches (not products): review by disagreement with
    the teachers, their labels as the stand-in for a person's, fine-tuning on two."""
    from kappamask.tools import realdata

    review = tmp_path / "review"
    shown = _kappamask(
        "review-scenes",
        "--multiband",
        str(SEN12MSCR),
        "--level",
        "L1C",
        "--out",
        str(review),
        "--top",
        "4",
        "--rank-by",
        "disagreement",
    )
    assert "4 sub-tiles ranked by disagreement" in shown
    index = json.loads((review / "index.json").read_text())["sub_tiles"]
    disagreements = [e["disagreement"] for e in index]
    assert disagreements == sorted(disagreements, reverse=True) and disagreements[0] > 0.0
    folder = ReviewFolder(review)
    assert folder.level() == "L1C"
    for tile in folder.tiles[:3]:
        patch = next(SEN12MSCR.glob(f"{tile.product_id.removeprefix('sen12mscr_')}.tif"))
        img = realdata.read_multiband(patch)
        with rasterio.open(tile.bands) as bands, rasterio.open(patch) as src:
            assert (bands.crs, bands.transform) == (src.crs, src.transform)
        labels = realdata.teacher_labels(img, "L1C")[0]
        folder.write_labels(tile.name, labels, {"source": "teachers"})
    out = tmp_path / "fine-tuned"
    _kappamask(
        "train",
        "--labels",
        f"labelled:{review}",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--out",
        str(out),
    )
    report = json.loads((out / "holdout.json").read_text())
    assert report["parent"]["name"] == "kappamask_l1c" and len(report["held_out"]) == 1
    assert report["unlabelled_changed"] is not None  # the fourth sub-tile nobody labelled
