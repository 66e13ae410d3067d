"""Teachers and their fusion into labels (distillation), and the real-data readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V, MaskClass
from kappamask.errors import InvalidInputError
from kappamask.tools import realdata, teachers
from kappamask.tools.distill import (
    ACQUISITION_KINDS,
    ScenesSource,
    held_out,
    holdout_report,
    load_scene,
    save_scene,
    scene_identity,
    split,
)
from kappamask.tools.realdata import Labelled

C = MaskClass
#: ukis-csmask's answers: background, cloud, shadow
B, K, S = teachers.UKIS_BACKGROUND, teachers.UKIS_CLOUD, teachers.UKIS_SHADOW


def _opinions(p: list[float], u: list[int], c: list[float], nir: list[float]) -> teachers.Opinions:
    as_row = lambda v, t: np.asarray([v], t)  # noqa: E731
    return teachers.Opinions(
        valid=np.ones((1, len(p)), bool),
        s2cloudless=as_row(p, np.float32),
        ukis=as_row(u, np.uint8),
        cirrus=as_row(c, np.float32),
        nir=as_row(nir, np.float32),
    )


def test_l1c_fusion_labels_only_what_the_teachers_agree_on() -> None:
    cases = [
        # (s2cloudless, ukis, B10, NIR) -> label
        ((0.05, B, 0.002, 0.3), C.CLEAR),
        ((0.90, K, 0.002, 0.6), C.CLOUD),
        ((0.90, K, 0.050, 0.6), C.CLOUD),  # opaque cloud high enough to show in B10
        ((0.30, B, 0.020, 0.3), C.SEMI_TRANSPARENT_CLOUD),  # cirrus over clear ground
        ((0.90, B, 0.020, 0.5), C.SEMI_TRANSPARENT_CLOUD),  # teachers split, B10 decides
        ((0.05, S, 0.002, 0.1), C.CLOUD_SHADOW),
        ((0.05, S, 0.002, 0.4), C.UNDEFINED),  # "shadow" bright in the NIR
        ((0.90, B, 0.002, 0.5), C.UNDEFINED),  # s2cloudless alone
        ((0.05, K, 0.002, 0.5), C.UNDEFINED),  # ukis-csmask alone
        ((0.35, B, 0.002, 0.3), C.UNDEFINED),  # s2cloudless undecided
        ((0.05, B, 0.010, 0.3), C.UNDEFINED),  # B10 between the cirrus thresholds
    ]
    p, u, c, n = (list(x) for x in zip(*[case for case, _ in cases], strict=True))
    expected = [int(want) for _, want in cases]
    labels = teachers.fuse_l1c(_opinions(p, u, c, n))
    assert labels[0].tolist() == expected


def test_l2a_fusion_keeps_scl_where_ukis_does_not_object() -> None:
    semi = C.SEMI_TRANSPARENT_CLOUD
    codes = [C.CLEAR, C.CLEAR, C.CLOUD, C.CLOUD, C.CLOUD_SHADOW, C.CLOUD_SHADOW, semi, semi, 0]
    scl = np.array([codes], np.uint8)
    ukis = np.array([[B, K, K, B, S, B, K, S, B]], np.uint8)
    op = teachers.Opinions(valid=np.ones(scl.shape, bool), ukis=ukis, scl=scl)
    assert teachers.fuse_l2a(op)[0].tolist() == [
        C.CLEAR,
        C.UNDEFINED,
        C.CLOUD,
        C.UNDEFINED,
        C.CLOUD_SHADOW,
        C.UNDEFINED,
        C.SEMI_TRANSPARENT_CLOUD,
        C.UNDEFINED,
        C.MISSING,
    ]


def test_fusion_refuses_missing_teachers() -> None:
    with pytest.raises(InvalidInputError, match="need s2cloudless"):
        teachers.fuse_l1c(teachers.Opinions(valid=np.ones((1, 1), bool)))
    with pytest.raises(InvalidInputError, match="need SCL"):
        teachers.fuse_l2a(teachers.Opinions(valid=np.ones((1, 1), bool)))


def _write_multiband(path: Path, dn: np.ndarray) -> Path:
    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "width": dn.shape[2],
        "height": dn.shape[1],
        "count": dn.shape[0],
        "crs": "EPSG:32633",
        "transform": Affine(10, 0, 500000, 0, -10, 5000000),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(dn)
    return path


def test_features_follow_the_served_formula(tmp_path: Path) -> None:
    """(DN + offset) / 65535 / max_v, no data as 0: what Triton receives."""
    dn = np.full((13, 4, 5), 1234, np.uint16)
    dn[:, 0, 0] = 0
    folder = tmp_path / "ROIs1970_fall_s2_cloudy"
    folder.mkdir()
    img = realdata.read_multiband(
        _write_multiband(folder / "ROIs1970_fall_s2_cloudy_136_p139.tif", dn)
    )
    assert img.group == "ROIs1970_fall_136"
    assert img.name == "ROIs1970_fall_s2_cloudy_ROIs1970_fall_s2_cloudy_136_p139"
    feats = realdata.features(img, "L1C")
    assert feats.shape == (13, 4, 5)
    np.testing.assert_allclose(
        feats[:, 1, 1], 1234 / 65535 / np.asarray(DEFAULT_MAX_V["L1C"]), rtol=1e-6
    )
    assert (feats[:, 0, 0] == 0).all()


def test_pseudo_l2a_subtracts_dark_objects_within_bounds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dn = rng.integers(500, 3000, (13, 32, 32)).astype(np.uint16)
    img = realdata.read_multiband(_write_multiband(tmp_path / "x.tif", dn))
    l2a = realdata.pseudo_l2a(img, np.random.default_rng(1))
    for band, cap in realdata.MAX_PATH_REFLECTANCE.items():
        removed = img.reflectance[band] - l2a.reflectance[band]
        assert removed.min() >= 0 and removed.max() <= cap + 1e-6, band
    feats = realdata.features(l2a, "L2A")
    assert feats.shape == (len(DEFAULT_FEATURES["L2A"]), 32, 32)
    lo, hi = realdata.AOT_DN_RANGE
    aot = feats[0] * 65535 * DEFAULT_MAX_V["L2A"][0]
    assert lo <= aot.min() and aot.max() <= hi


def _scene(name: str, group: str, labels: np.ndarray) -> Labelled:
    return Labelled(name, group, "L1C", np.ones((13, *labels.shape), np.float32), labels, {})


def test_split_holds_out_whole_acquisitions() -> None:
    lab = np.full((8, 8), C.CLEAR, np.uint8)
    scenes = [
        _scene("a_cloudy_1", "a", lab),
        _scene("a_clear_1", "a", lab),
        _scene("b_1", "b", lab),
    ]
    train, held = split(scenes, ["a"])
    assert {s.name for s in held} == {"a_cloudy_1", "a_clear_1"}
    assert [s.name for s in train] == ["b_1"]
    # holding out one patch of an acquisition whose other patch trains would leak
    with pytest.raises(InvalidInputError, match="also in training: a_clear_1"):
        split(scenes, ["a_cloudy"])
    with pytest.raises(InvalidInputError, match="nothing left to train"):
        split(scenes, ["a", "b"])
    # a SEN12MS-CR pair's file names do not contain their acquisition, the group does
    pair = _scene("cr_pairs_ROIs1970_fall_s2_cloudy_85_p492", "ROIs1970_fall_85", lab)
    assert held_out(pair.name, pair.group, ["ROIs1970_fall_85"])
    assert not held_out(pair.name, pair.group, ["fall_139"])


def test_the_holdout_report_counts_cloud_free_acquisitions_apart(tmp_path: Path) -> None:
    """ukis-csmask's shadow in a scene published as cloud-free is dark ground: the report
    gives shadow recall per acquisition kind, so a model that keeps that ground clear is
    seen to find the shadows of the cloudy scenes; the kind survives the label cache."""
    clear = np.full((4, 4), C.CLEAR, np.uint8)
    ukis = clear.copy()
    ukis[:2] = C.CLOUD_SHADOW  # half of each scene
    cloudy = Labelled("c", "c", "L1C", np.ones((13, 4, 4), np.float32), clear, {}, False)
    cloudy.teacher_masks = {"ukis-csmask": ukis, "s2cloudless": clear}
    free = Labelled("f", "f", "L1C", np.zeros((13, 4, 4), np.float32), clear, {}, True)
    free.teacher_masks = dict(cloudy.teacher_masks)
    # the model sees shadow where the features are ones: the cloudy scene's half
    report = holdout_report(
        [cloudy, free], lambda f: np.where(f[0] > 0, C.CLOUD_SHADOW, C.CLEAR).astype(np.uint8)
    )
    recall = {
        k: v["ukis-csmask"]["shadow_recall"] for k, v in report["trust_by_acquisition"].items()
    }
    assert recall == {ACQUISITION_KINDS[False]: 1.0, ACQUISITION_KINDS[True]: 0.0}
    assert report["trust"]["ukis-csmask"]["shadow_recall"] == 0.5
    save_scene(free, tmp_path / "f.npz")
    assert load_scene(tmp_path / "f.npz").cloud_free is True
    # a cache written before the kind was recorded: not guessed
    with np.load(tmp_path / "f.npz") as z:
        old = {**z, "meta": json.dumps(["f", "f", "L1C"])}
    np.savez_compressed(tmp_path / "old.npz", **old)
    assert load_scene(tmp_path / "old.npz").cloud_free is None
    assert scene_identity(tmp_path / "old.npz") == ("f", "f")


def test_crops_come_from_labelled_pixels_and_small_scenes_are_padded() -> None:
    labels = np.full((40, 40), C.UNDEFINED, np.uint8)
    labels[:30, :30] = C.CLOUD  # 22 % of a 64 px crop of the padded scene
    source = ScenesSource([_scene("s", "s", labels)])
    rng = np.random.default_rng(0)
    for _ in range(5):
        feats, lab = source.train_crop(64, rng)
        assert feats.shape == (13, 64, 64) and lab.shape == (64, 64)
        assert (lab == C.CLOUD).sum() == 900
        assert (lab[feats[0] == 0] == C.MISSING).all()  # padding is no data


def _cumulus_crop(level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real cumulus over farmland (L2A: brought near bottom of atmosphere): its features,
    labels all CLEAR for the test to mark, and its visible brightness."""
    path = Path(__file__).parent / "data" / "sen12mscr" / "ROIs1970_fall_s2_cloudy_136_p139.tif"
    img = realdata.read_multiband(path)
    img = img if level == "L1C" else realdata.pseudo_l2a(img, np.random.default_rng(0))
    labels = np.full(img.shape, C.CLEAR, np.uint8)
    visible = np.mean([img.reflectance[b] for b in ("B02", "B03", "B04")], axis=0)
    return realdata.features(img, level), labels, visible


@pytest.mark.parametrize("level", ["L1C", "L2A"])
def test_bare_ground_crops_look_like_desert_and_keep_clouds(level: str) -> None:
    """Real cumulus over farmland: the clear ground becomes bright bare ground (red above
    blue, SWIR above NIR, little vegetation: not the white, flat spectrum of cloud); the
    cloud pixels, the unlabelled ones near them, B10, AOT and WVP stay as they were."""
    feats, labels, visible = _cumulus_crop(level)
    labels[visible > 0.5] = C.CLOUD
    labels[(visible > 0.3) & (visible <= 0.5)] = C.UNDEFINED
    labels[:4] = C.MISSING
    names, scale = DEFAULT_FEATURES[level], realdata.reflectance_scale(level)
    ground = labels == C.CLEAR
    assert ground.mean() > 0.3 and (labels == C.CLOUD).any()
    shares = []
    for seed in range(8):
        out = realdata.bare_ground_crop(feats, labels, level, np.random.default_rng(seed))
        changed = (out != feats).any(axis=0)
        assert not changed[~ground].any()  # clouds, unlabelled pixels, no data: as they were
        desert = changed & ground
        shares.append(desert.sum() / ground.sum())
        refl = {n: out[i][desert] * scale[i] for i, n in enumerate(names)}
        red, blue, nir = refl["B04"], refl["B02"], refl["B8A"]
        assert np.median(red / blue) > 1.3
        assert np.median((nir - red) / (nir + red)) < 0.3
        assert np.median(refl["B11"] / nir) > 1.0
        assert 0.1 < np.median(red) < 0.6 and red.max() <= 1.0
        for kept in ("B10", "AOT", "WVP"):
            if kept in names:
                assert np.array_equal(out[names.index(kept)], feats[names.index(kept)])
    # a part of the crop, one region (never all of it every time): the rest keeps its fields
    lo = realdata.SURFACE_COVER[0]
    assert all(lo - 0.1 < share <= 1.0 for share in shares) and min(shares) < 0.9, shares
    # a cloud-free crop: the unlabelled pixels become ground too
    calm = np.where(labels == C.CLOUD, C.UNDEFINED, labels).astype(np.uint8)
    out = realdata.bare_ground_crop(feats, calm, level, np.random.default_rng(3))
    changed = (out != feats).any(axis=0)
    assert changed[calm == C.UNDEFINED].any() and not changed[calm == C.MISSING].any()


@pytest.mark.parametrize("level", ["L1C", "L2A"])
def test_open_water_crops_look_like_water_and_keep_clouds(level: str) -> None:
    """Real cumulus over farmland: the clear ground becomes open water (dark past 700 nm,
    green above NIR, darkest in the SWIR); clouds and their surroundings stay."""
    feats, labels, visible = _cumulus_crop(level)
    labels[visible > 0.3] = C.CLOUD
    names, scale = DEFAULT_FEATURES[level], realdata.reflectance_scale(level)
    ground = labels == C.CLEAR
    for seed in range(6):
        out = realdata.open_water_crop(feats, labels, level, np.random.default_rng(seed))
        changed = (out != feats).any(axis=0)
        assert not changed[~ground].any() and changed.any()
        refl = {n: out[i][changed] * scale[i] for i, n in enumerate(names)}
        green, nir, swir = refl["B03"], refl["B8A"], refl["B12"]
        assert np.median((green - nir) / (green + nir)) > 0.2  # NDWI: water
        assert np.median(nir) < (0.1 if level == "L1C" else 0.06)
        assert np.median(swir) < np.median(nir) + 0.01
        # waves and glint: the surface is not one flat value
        assert np.std(refl["B02"]) > 1e-4


@pytest.mark.parametrize("kind", ["bare_ground", "open_water"])
def test_surfaces_are_drawn_for_the_share_of_crops_asked(kind: str) -> None:
    rng = np.random.default_rng(0)
    labels = np.full((64, 64), C.CLEAR, np.uint8)
    feats = np.stack([np.full((64, 64), 0.1, np.float32)] * 13)  # grey ground
    scene = Labelled("s", "s", "L1C", feats, labels, {})
    for share, low, high in ((0.0, 0, 0), (0.2, 20, 60), (1.0, 200, 200)):
        source = ScenesSource([scene], **{kind: share})
        changed = sum(
            not np.array_equal(source.train_crop(32, rng)[0], feats[:, :32, :32])
            for _ in range(200)
        )
        assert low <= changed <= high, (share, changed)


@pytest.mark.slow
def test_teachers_on_a_real_cloudy_patch() -> None:
    """s2cloudless and ukis-csmask on real SEN12MS-CR pixels: both find the cumulus."""
    path = Path(__file__).parent / "data" / "sen12mscr" / "ROIs1970_fall_s2_cloudy_136_p139.tif"
    img = realdata.read_multiband(path)
    prob = teachers.s2cloudless_probability(img.reflectance)
    ukis = teachers.ukis_classes(img.reflectance, "L1C", img.resolution)
    visible = np.mean([img.reflectance[b] for b in ("B02", "B03", "B04")], axis=0)
    bright, dark = visible > 0.5, visible < 0.15  # thick cloud; vegetation and shadow
    assert prob[bright].mean() > 0.9 and prob[dark].mean() < 0.3
    assert (ukis[bright] == teachers.UKIS_CLOUD).mean() > 0.9
    assert (ukis[dark] == teachers.UKIS_CLOUD).mean() < 0.15
    labels = realdata.label(img, "L1C").labels
    assert {int(v) for v in np.unique(labels)} >= {C.CLEAR, C.CLOUD}


@pytest.mark.slow
def test_distill_end_to_end_on_real_patches(tmp_path: Path) -> None:
    """`kappamask distill` on two real acquisitions (the cumulus patch, and the same
    pixels mirrored under another area's name): labels cached, one held out, a served
    model exported, and the held-out report next to the teachers' own agreement."""
    from click.testing import CliRunner

    from kappamask.cli import main
    from kappamask.inference.model_spec import ORIGIN_BOOTSTRAP
    from kappamask.inference.repository import spec_from_onnx

    patches = tmp_path / "patches"
    patches.mkdir()
    real = Path(__file__).parent / "data" / "sen12mscr" / "ROIs1970_fall_s2_cloudy_136_p139.tif"
    shutil.copyfile(real, patches / real.name)
    with rasterio.open(real) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(patches / "ROIs2017_winter_s2_cloudy_84_p1.tif", "w", **profile) as dst:
        dst.write(data[:, ::-1, :])
    args = [
        "distill",
        "--level",
        "L1C",
        "--out",
        str(tmp_path / "run"),
        "--multiband",
        str(patches),
        "--holdout",
        "ROIs2017_winter_84",
        "--filters",
        "4",
        "--crop",
        "64",
        "--batch-size",
        "2",
        "--steps-per-epoch",
        "2",
        "--epochs",
        "1",
        "--version-label",
        "tiny",
    ]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    cached = sorted((tmp_path / "run" / "scenes").glob("L1C_*.npz"))
    assert len(cached) == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["holdout_scenes"] == ["patches_ROIs2017_winter_s2_cloudy_84_p1"]
    report = json.loads((tmp_path / "run" / "holdout.json").read_text())
    assert {
        "model vs fused labels",
        "model vs s2cloudless",
        "s2cloudless vs ukis-csmask",
        "ukis-csmask vs s2cloudless",
    } <= set(report)
    # the teachers see the same clouds in the mirrored patch as in the original
    assert report["s2cloudless vs ukis-csmask"]["two_class"]["classes"]["cloud"]["dice"] > 0.6
    # both patches are cloudy acquisitions; their kind is counted apart in the report
    assert set(report["trust_by_acquisition"]) == {ACQUISITION_KINDS[False]}
    spec = spec_from_onnx(tmp_path / "run" / "model.onnx")
    assert spec.origin == ORIGIN_BOOTSTRAP and spec.version_label == "tiny"
    # a second run reuses the cached labels (the teachers are not run again)
    stamps = [p.stat().st_mtime_ns for p in cached]
    (tmp_path / "run" / "checkpoint.pt").unlink(missing_ok=True)
    assert CliRunner().invoke(main, args).exit_code == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamps
