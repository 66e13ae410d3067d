"""Teachers for distilling bootstrap weights (training time only, never in the service).

Each teacher maps reflectances of one scene to its own opinion of the pixels:

- s2cloudless (Sinergise; PyPI ``s2cloudless``, CC BY-SA 4.0): per-pixel cloud probability
  of L1C top-of-atmosphere reflectances (a LightGBM on 10 bands).
- ukis-csmask (DLR; PyPI ``ukis-csmask``, Apache-2.0): a CNN for background / cloud /
  cloud shadow, with L1C and L2A models on blue, green, red, NIR, SWIR1, SWIR2.
- Sen2Cor's scene classification (SCL) of an L2A product, mapped by the paper's Table 1.
- A physical rule on B10 (1375 nm, a water-vapour absorption band the surface barely
  reaches): top-of-atmosphere reflectance above ``CIRRUS_B10`` is high, thin ice cloud.

``fuse_l1c`` and ``fuse_l2a`` turn the opinions into labels. A pixel gets a class only
where the teachers that can judge it agree; elsewhere it is UNDEFINED, which the loss
and the metrics leave out. We leave disagreement out rather than weight it: the pixels
the teachers dispute (cloud edges, haze, bright ground) are exactly where a weighted
vote would teach one teacher's known mistakes as truth.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kappamask.bands import MaskClass
from kappamask.errors import InvalidInputError

#: Bands s2cloudless reads (its ``all_bands=False`` order).
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
#: ukis-csmask's six-band model: its band names for our bands.
UKIS_BANDS = {
    "B02": "blue",
    "B03": "green",
    "B04": "red",
    "B8A": "nir",
    "B11": "swir16",
    "B12": "swir22",
}
#: ukis-csmask classes.
UKIS_BACKGROUND, UKIS_CLOUD, UKIS_SHADOW = 0, 1, 2
#: ukis-csmask was trained near 30 m; it is run at the closest integer factor of the input.
UKIS_RESOLUTION = 30.0

#: s2cloudless probability at and above which a pixel counts as cloudy, and below which
#: it counts as clear (between the two: no opinion). 0.4 is its authors' mask threshold.
S2CLOUDLESS_CLOUD = 0.5
S2CLOUDLESS_CLEAR = 0.25
#: Top-of-atmosphere B10 reflectance above which the sky holds cirrus (Sen2Cor's thin-cirrus
#: threshold is 0.012), and below which it certainly holds none.
CIRRUS_B10 = 0.012
NO_CIRRUS_B10 = 0.008
#: Shadows are dark: ukis-csmask's shadow is kept only where the NIR reflectance is below this.
SHADOW_MAX_NIR = 0.25


@dataclass(frozen=True)
class Opinions:
    """What each teacher said of each pixel of one scene (None: teacher not applicable)."""

    valid: np.ndarray
    s2cloudless: np.ndarray | None = None  # cloud probability 0..1
    ukis: np.ndarray | None = None  # UKIS_* classes
    cirrus: np.ndarray | None = None  # B10 TOA reflectance
    scl: np.ndarray | None = None  # mask codes from SCL (Table 1)
    nir: np.ndarray | None = None  # NIR reflectance (B8A or B08)
    #: Sun geometry (kappamask.assembly.shadows.cloud_reach): where some teacher's cloud lies up-sun
    #: at a distance a cloud height explains (a shadow is possible), and where the up-sun ray
    #: leaves the scene first (unknown). None: no geometry, every shadow is possible.
    cast: np.ndarray | None = None
    unsure: np.ndarray | None = None
    #: The scene was published as a cloud-free acquisition (realdata.Imagery.cloud_free):
    #: its B10 says nothing of cirrus (below).
    cloud_free: bool = False

    def shadow_verdicts(self, shadow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A teacher's ``shadow`` split by the geometry into (possible, impossible): shadow
        no cloud of the scene can cast, with the whole up-sun ray inside it, is dark ground
        (forest, water, dark soil) and is taught as CLEAR."""
        if self.cast is None:
            return shadow, np.zeros_like(shadow)
        impossible = shadow & ~self.cast
        if self.unsure is not None:
            impossible &= ~self.unsure
        return shadow & self.cast, impossible


def _band_stack(reflectance: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    missing = [n for n in names if n not in reflectance]
    if missing:
        raise InvalidInputError(f"teacher needs band(s) {', '.join(missing)}")
    stack: np.ndarray = np.stack([reflectance[n] for n in names], axis=-1).astype(np.float32)
    return stack


def s2cloudless_probability(reflectance: dict[str, np.ndarray]) -> np.ndarray:
    """s2cloudless' per-pixel cloud probability [H, W] of L1C TOA reflectances."""
    from s2cloudless.cloud_detector import S2PixelCloudDetector

    stack = _band_stack(reflectance, S2CLOUDLESS_BANDS)
    detector = S2PixelCloudDetector(threshold=0.4, average_over=1, dilation_size=0, all_bands=False)
    probability: np.ndarray = detector.get_cloud_probability_maps(stack[None])[0]
    return probability.astype(np.float32)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    mean: np.ndarray = a[:h, :w].reshape(h // k, k, w // k, k, *a.shape[2:]).mean(axis=(1, 3))
    return mean


def ukis_classes(reflectance: dict[str, np.ndarray], level: str, resolution: float) -> np.ndarray:
    """ukis-csmask's classes [H, W], run near its 30 m and brought back (nearest)."""
    import onnxruntime  # noqa: F401  (ukis-csmask's runtime; fail here, not inside it)
    from ukis_csmask.mask import CSmask

    stack = _band_stack(reflectance, list(UKIS_BANDS))
    h, w = stack.shape[:2]
    k = max(1, round(UKIS_RESOLUTION / resolution))
    small = _block_mean(stack, k) if k > 1 else stack
    # The model tiles at 256 px: smaller inputs are padded by reflection, not zeros.
    ph, pw = max(0, 256 - small.shape[0]), max(0, 256 - small.shape[1])
    padded = np.pad(small, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = CSmask(
            np.ascontiguousarray(padded, np.float32),
            band_order=[UKIS_BANDS[b] for b in UKIS_BANDS],
            product_level=level.lower(),
            intra_op_num_threads=1,
            inter_op_num_threads=1,
        ).csm[..., 0]
    mask = mask[: small.shape[0], : small.shape[1]]
    if k > 1:
        mask = np.repeat(np.repeat(mask, k, axis=0), k, axis=1)
        mask = np.pad(mask, ((0, h - mask.shape[0]), (0, w - mask.shape[1])), mode="edge")
    classes: np.ndarray = mask.astype(np.uint8)
    return classes


def fuse_l1c(op: Opinions) -> np.ndarray:
    """Labels of an L1C scene from s2cloudless, ukis-csmask and the B10 rule.

    - CLOUD: s2cloudless >= 0.5 and ukis-csmask cloud (and no lower than the cirrus rule
      would allow: thick cloud is bright in every band, which s2cloudless measures);
    - SEMI_TRANSPARENT_CLOUD: thin cloud, ukis-csmask cloud where s2cloudless is between
      its clear and cloud thresholds (0.25-0.5: it sees cloud but not an opaque one; 2.9 %
      of the cloudy SEN12MS-CR pixels), or B10 above the cirrus threshold where the two
      CNN/GBM teachers do not both call it opaque cloud;
    - CLOUD_SHADOW: ukis-csmask shadow, dark in the NIR, s2cloudless clear, no cirrus, and
      a cloud up-sun to cast it (``Opinions.shadow_verdicts``);
    - CLEAR: all three say clear, or ukis-csmask's shadow where s2cloudless and B10 say
      clear and no cloud of the scene can cast it (dark forest, water, soil);
    - in a scene published as cloud-free, B10 is not read as cirrus: where the air is dry
      (winter, high ground) the surface shows through the 1375 nm band and lifts it over
      the threshold everywhere. Measured on the SEN12MS-CR(-TS) patches: 25 % of the
      cloud-free training scenes' pixels were labelled semi-transparent by B10 alone, and
      none of the cloudy scenes' were: the rule taught "dry air is cirrus". There, CLEAR is
      where s2cloudless and ukis-csmask say clear;
    - anything else: UNDEFINED (left out of the loss).
    """
    if op.s2cloudless is None or op.ukis is None or op.cirrus is None:
        raise InvalidInputError("L1C labels need s2cloudless, ukis-csmask and B10")
    p, u, c = op.s2cloudless, op.ukis, op.cirrus
    labels = np.full(p.shape, MaskClass.UNDEFINED, np.uint8)
    no_cirrus = np.ones(c.shape, bool) if op.cloud_free else c < NO_CIRRUS_B10
    clear = (p < S2CLOUDLESS_CLEAR) & (u == UKIS_BACKGROUND) & no_cirrus
    cloud = (p >= S2CLOUDLESS_CLOUD) & (u == UKIS_CLOUD)
    # thin cloud: ukis-csmask sees cloud where s2cloudless is not sure it is opaque
    thin = (p >= S2CLOUDLESS_CLEAR) & (p < S2CLOUDLESS_CLOUD) & (u == UKIS_CLOUD)
    cirrus = (c >= CIRRUS_B10) & ~cloud & (u != UKIS_SHADOW) & (not op.cloud_free)
    semi = thin | cirrus
    dark = op.nir < SHADOW_MAX_NIR if op.nir is not None else np.ones_like(clear)
    quiet = (p < S2CLOUDLESS_CLEAR) & no_cirrus
    shadow, dark_ground = op.shadow_verdicts((u == UKIS_SHADOW) & quiet)
    shadow &= dark
    labels[clear | dark_ground] = MaskClass.CLEAR
    labels[shadow] = MaskClass.CLOUD_SHADOW
    labels[semi] = MaskClass.SEMI_TRANSPARENT_CLOUD
    labels[cloud] = MaskClass.CLOUD
    labels[~op.valid] = MaskClass.MISSING
    return labels


def fuse_l2a(op: Opinions) -> np.ndarray:
    """Labels of an L2A scene from Sen2Cor's SCL and ukis-csmask (L2A model).

    SCL is the reference the L2A model is judged against, so it leads; ukis-csmask vetoes:
    SCL cloud and shadow are kept where ukis-csmask agrees, SCL clear where ukis-csmask
    sees background, SCL thin cirrus where ukis-csmask does not call it shadow (it has no
    semi-transparent class, so either of its other answers is compatible). A shadow of
    either teacher that no cloud can cast (``Opinions.shadow_verdicts``) is CLEAR where
    neither calls it cloud. Everything else is UNDEFINED.
    """
    if op.scl is None or op.ukis is None:
        raise InvalidInputError("L2A labels need SCL and ukis-csmask")
    s, u = op.scl, op.ukis
    labels = np.full(s.shape, MaskClass.UNDEFINED, np.uint8)
    agree = (
        ((s == MaskClass.CLEAR) & (u == UKIS_BACKGROUND))
        | ((s == MaskClass.CLOUD) & (u == UKIS_CLOUD))
        | ((s == MaskClass.CLOUD_SHADOW) & (u == UKIS_SHADOW))
        | ((s == MaskClass.SEMI_TRANSPARENT_CLOUD) & (u != UKIS_SHADOW))
    )
    labels[agree] = s[agree]
    not_cloud = np.isin(s, (MaskClass.CLEAR, MaskClass.CLOUD_SHADOW)) & (u != UKIS_CLOUD)
    possible, dark_ground = op.shadow_verdicts(
        not_cloud & ((s == MaskClass.CLOUD_SHADOW) | (u == UKIS_SHADOW))
    )
    labels[(labels == MaskClass.CLOUD_SHADOW) & ~possible] = MaskClass.UNDEFINED
    labels[dark_ground] = MaskClass.CLEAR
    labels[(s == MaskClass.MISSING) | ~op.valid] = MaskClass.MISSING
    return labels


def ukis_as_mask(ukis: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """ukis-csmask's classes as mask codes (it has no semi-transparent class)."""
    lut = np.array([MaskClass.CLEAR, MaskClass.CLOUD, MaskClass.CLOUD_SHADOW], np.uint8)
    out: np.ndarray = lut[np.minimum(ukis, 2)]
    out[~valid] = MaskClass.MISSING
    return out


def s2cloudless_as_mask(probability: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """s2cloudless' mask as its authors make it (threshold 0.4, no dilation), as codes."""
    out: np.ndarray = np.where(probability >= 0.4, MaskClass.CLOUD, MaskClass.CLEAR).astype(
        np.uint8
    )
    out[~valid] = MaskClass.MISSING
    return out
