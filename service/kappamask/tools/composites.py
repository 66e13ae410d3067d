"""Synthetic cloud composites over real clear scenes, with exact labels (paper §2.3 data,
here for bootstrap training where KappaSet cannot be had).

Work in reflectance: features are turned back into reflectance with the model's max_v,
clouds are blended in with an opacity field, shadows darken the surface where the
clouds' footprint lands when shifted away from the sun, and the result is normalised
again. Spectra are typical top-of-atmosphere values: thick water cloud is bright and
flat in the visible and near infrared, darker in the SWIR and at the 940/1375 nm water
vapour bands; thin ice cirrus adds a little everywhere and stands out only in B10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kappamask.bands import AUX_BANDS, DN_SCALE, MaskClass

#: Reflectance of a thick cloud top per band (B10: high tops only).
THICK_CLOUD = {
    "B01": 0.62,
    "B02": 0.60,
    "B03": 0.58,
    "B04": 0.58,
    "B05": 0.59,
    "B06": 0.60,
    "B07": 0.61,
    "B08": 0.61,
    "B8A": 0.60,
    "B09": 0.28,
    "B10": 0.10,
    "B11": 0.38,
    "B12": 0.24,
}
#: Reflectance a thin cirrus sheet adds at full opacity (B10 is where it shows).
CIRRUS = {
    "B01": 0.10,
    "B02": 0.09,
    "B03": 0.09,
    "B04": 0.09,
    "B05": 0.09,
    "B06": 0.09,
    "B07": 0.09,
    "B08": 0.09,
    "B8A": 0.09,
    "B09": 0.07,
    "B10": 0.09,
    "B11": 0.07,
    "B12": 0.05,
}
#: Reflectance units of the normalised features: value * max_v * SCALE = reflectance.
_TO_REFLECTANCE = DN_SCALE / 10000.0


@dataclass(frozen=True)
class CompositeConfig:
    """How much of what a composite holds (ranges are drawn per crop)."""

    thick_cover: tuple[float, float] = (0.0, 0.45)
    thin_cover: tuple[float, float] = (0.0, 0.35)
    cloud_height_px: tuple[float, float] = (5.0, 60.0)
    shadow_darkening: tuple[float, float] = (0.35, 0.7)
    #: Opacity above which a pixel is opaque cloud, and below which it is clear.
    opaque: float = 0.65
    visible: float = 0.08
    #: Shifted cloud density above which the surface is in shadow.
    shadow_edge: float = 0.25


def fractal_field(
    shape: tuple[int, int], rng: np.random.Generator, beta: float = 3.2
) -> np.ndarray:
    """A smooth random field (1/f^beta spectrum) scaled to [0, 1]: cloud-like shapes."""
    h, w = shape
    noise = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = 1.0
    spectrum = np.fft.rfft2(noise) / freq ** (beta / 2)
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(h, w))
    field -= field.min()
    peak = field.max()
    return field / peak if peak > 0 else field


def _opacity(field: np.ndarray, cover: float, softness: float) -> np.ndarray:
    """Opacity in [0, 1] covering about ``cover`` of the area, with soft edges."""
    if cover <= 0:
        return np.zeros_like(field)
    threshold = np.quantile(field, 1.0 - cover)
    opacity: np.ndarray = np.clip((field - threshold) / softness, 0.0, 1.0)
    return opacity


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def compose(
    features: np.ndarray,
    valid: np.ndarray,
    feature_names: Sequence[str],
    max_v: Sequence[float],
    rng: np.random.Generator,
    config: CompositeConfig | None = None,
    sun_azimuth: float | None = None,
    sun_zenith: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clouds, cirrus and shadows over clear ``features`` [C, H, W] (normalised).

    Returns (features, labels) with exact labels: CLOUD where the opacity of thick cloud
    is above ``opaque``, SEMI_TRANSPARENT_CLOUD where thin cloud or a thick cloud's edge
    is visible, CLOUD_SHADOW where a cloud's footprint falls, CLEAR elsewhere, MISSING
    where ``valid`` is False.
    """
    config = config or CompositeConfig()
    _c, h, w = features.shape
    scale = np.asarray(max_v, np.float32)[:, None, None] * _TO_REFLECTANCE
    refl = features * scale
    thick = _opacity(fractal_field((h, w), rng), rng.uniform(*config.thick_cover), 0.08)
    thin = _opacity(fractal_field((h, w), rng, beta=2.6), rng.uniform(*config.thin_cover), 0.5)
    thin *= rng.uniform(0.3, 0.9)  # cirrus never becomes opaque
    # what is below the visible threshold is not there, so that "clear" means untouched
    thick[thick < config.visible] = 0.0
    thin[thin < config.visible] = 0.0
    # shadow: the cloud footprint moved away from the sun by height x tan(zenith)
    azimuth = math.radians(sun_azimuth if sun_azimuth is not None else rng.uniform(0, 360))
    zenith = math.radians(sun_zenith if sun_zenith is not None else rng.uniform(20, 65))
    dist = rng.uniform(*config.cloud_height_px) * math.tan(zenith)
    dy, dx = round(math.cos(azimuth) * dist), round(-math.sin(azimuth) * dist)
    shadow = _shift(np.maximum(thick, thin * 0.5), dy, dx)
    # darkening only inside the labelled shadow, at least 40 % of full strength there
    inside = shadow > config.shadow_edge
    strength = np.where(
        inside, np.clip(0.4 + (shadow - config.shadow_edge) / config.shadow_edge, 0.0, 1.0), 0.0
    )
    darkening = 1.0 - rng.uniform(*config.shadow_darkening) * strength
    brightness = rng.uniform(0.85, 1.15)
    for i, name in enumerate(feature_names):
        if name in AUX_BANDS:
            continue  # aerosol and water vapour estimates are not reflectances
        surface = refl[i] * darkening
        with_cirrus = surface + thin * CIRRUS[name]
        refl[i] = (1 - thick) * with_cirrus + thick * THICK_CLOUD[name] * brightness
    out = (refl / scale).astype(np.float32)
    labels = np.full((h, w), MaskClass.CLEAR, np.uint8)
    labels[(shadow > config.shadow_edge) & (thick < config.visible)] = MaskClass.CLOUD_SHADOW
    labels[(thin >= config.visible) | (thick >= config.visible)] = MaskClass.SEMI_TRANSPARENT_CLOUD
    labels[thick >= config.opaque] = MaskClass.CLOUD
    labels[~valid] = MaskClass.MISSING
    out[:, ~valid] = 0.0
    return out, labels
