"""Windowed reads of a product's bands, resampled to the output grid and normalised.

Each band file is opened once; a window of the output grid is read through a GDAL warped
VRT that resamples (Lanczos, the windowed sinc of the paper, or bilinear) and keeps
no-data pixels (DN 0) out of the resampling kernel, so the swath edge does not ring.
Bands already on the output grid are read as they are: a warp at identity changes no
value and costs as much as a resampling one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from kappamask.bands import AUX_BANDS, BAND_SUBSTITUTES, DN_SCALE, RESOLUTIONS
from kappamask.errors import InvalidInputError, ProductError
from kappamask.sources.product import Product

LOGGER = logging.getLogger(__name__)

RESAMPLING = {"lanczos": Resampling.lanczos, "bilinear": Resampling.bilinear}

#: GDAL settings of every read: threads for JPEG 2000 decoding, a block cache that
#: holds a strip of every band, and no directory listing on remote files.
GDAL_ENV = {
    "GDAL_NUM_THREADS": "ALL_CPUS",
    "GDAL_CACHEMAX": 512,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}


@dataclass(frozen=True)
class Grid:
    """The output raster grid: CRS, affine transform and size in pixels."""

    crs: str
    transform: Affine
    width: int
    height: int

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return (
            left,
            top + self.height * self.transform.e,
            left + self.width * self.transform.a,
            top,
        )


def output_grid(product: Product, resolution: int) -> Grid:
    """The grid at ``resolution`` metres covering the product's tile."""
    if resolution not in RESOLUTIONS:
        raise InvalidInputError(f"resolution must be one of {RESOLUTIONS}, not {resolution}")
    band = next((b for b in ("B02", "B04", "B8A", "B01") if product.has_band(b)), None)
    if band is None:
        raise ProductError(f"{product.product_id} has no spectral band files")
    path, _res = product.band_path(band, resolution)
    try:
        with product.rasterio_env(**GDAL_ENV), rasterio.open(path) as src:
            left, bottom, right, top = src.bounds
            crs = src.crs.to_string() if src.crs else product.crs
    except RasterioIOError as err:
        raise ProductError(f"cannot open {band} of {product.product_id}: {err}") from err
    width = math.ceil(round((right - left) / resolution, 6))
    height = math.ceil(round((top - bottom) / resolution, 6))
    return Grid(crs, Affine(resolution, 0.0, left, 0.0, -resolution, top), width, height)


def resolve_features(product: Product, features: Sequence[str]) -> dict[str, str]:
    """Map each model feature to the product layer that provides it.

    Raises a ProductError naming every missing band when a feature has neither its own
    file nor a stand-in from ``BAND_SUBSTITUTES``.
    """
    layers: dict[str, str] = {}
    missing = []
    for feature in features:
        if product.has_band(feature):
            layers[feature] = feature
        elif product.has_band(BAND_SUBSTITUTES.get(feature, "")):
            layers[feature] = BAND_SUBSTITUTES[feature]
            LOGGER.warning(
                "%s has no %s: using %s in its place", product.product_id, feature, layers[feature]
            )
        else:
            missing.append(feature)
    if missing:
        raise ProductError(
            f"{product.product_id} ({product.level}) lacks band(s) {', '.join(missing)} "
            "needed by the model"
        )
    return layers


def normalise(dn: np.ndarray, offset: float, max_v: float) -> np.ndarray:
    """DESIGN §3: (DN + offset) / 65535 / max_v, negative results set to 0 (in place)."""
    dn += offset
    dn *= 1.0 / (DN_SCALE * max_v)
    np.maximum(dn, 0.0, out=dn)
    return dn


class BandReader:
    """Reads normalised model features for windows of the output grid.

    Use as a context manager; ``read(window)`` returns ``(features, valid)`` with
    ``features`` float32 [C, h, w] (invalid pixels 0) and ``valid`` bool [h, w]: a pixel
    is valid where every spectral feature has data.
    """

    def __init__(
        self,
        product: Product,
        features: Sequence[str],
        max_v: Sequence[float],
        grid: Grid,
        resampling: str = "lanczos",
    ) -> None:
        if resampling not in RESAMPLING:
            raise InvalidInputError(f"resampling must be one of {sorted(RESAMPLING)}")
        if len(features) != len(max_v):
            raise ValueError("features and max_v differ in length")
        self.product = product
        self.features = tuple(features)
        self.max_v = tuple(float(v) for v in max_v)
        self.grid = grid
        self.resampling = RESAMPLING[resampling]
        self.layers = resolve_features(product, features)
        self._stack = ExitStack()
        self._vrts: dict[str, WarpedVRT | rasterio.io.DatasetReader] = {}

    def __enter__(self) -> BandReader:
        self._stack.enter_context(self.product.rasterio_env(**GDAL_ENV))
        try:
            for layer in dict.fromkeys(self.layers.values()):
                path, _res = self.product.band_path(layer, int(self.grid.resolution))
                src = self._stack.enter_context(rasterio.open(path))
                if self._on_grid(src):
                    self._vrts[layer] = src
                    continue
                self._vrts[layer] = self._stack.enter_context(
                    WarpedVRT(
                        src,
                        crs=self.grid.crs,
                        transform=self.grid.transform,
                        width=self.grid.width,
                        height=self.grid.height,
                        resampling=self.resampling,
                        src_nodata=0,
                        nodata=np.nan,
                        dtype="float32",
                    )
                )
        except RasterioIOError as err:
            self._stack.close()
            raise ProductError(f"cannot open a band of {self.product.product_id}: {err}") from err
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _on_grid(self, src: rasterio.io.DatasetReader) -> bool:
        return bool(
            src.crs is not None
            and src.crs.to_string() == self.grid.crs
            and src.transform.almost_equals(self.grid.transform)
            and (src.width, src.height) == (self.grid.width, self.grid.height)
        )

    def _read_layer(self, layer: str, window: Window) -> np.ndarray:
        """One layer's window as float32, NaN where there is no data."""
        source = self._vrts[layer]
        if isinstance(source, WarpedVRT):
            data: np.ndarray = source.read(1, window=window)
            return data
        data = source.read(1, window=window, out_dtype="float32")
        data[data == 0] = np.nan
        return data

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Read ``window`` of the grid: normalised features and the validity mask."""
        h, w = int(window.height), int(window.width)
        out = np.zeros((len(self.features), h, w), dtype=np.float32)
        valid = np.ones((h, w), dtype=bool)
        cache: dict[str, np.ndarray] = {}
        for i, (feature, max_v) in enumerate(zip(self.features, self.max_v, strict=True)):
            layer = self.layers[feature]
            if layer not in cache:
                try:
                    cache[layer] = self._read_layer(layer, window)
                except RasterioIOError as err:
                    raise ProductError(
                        f"cannot decode {layer} of {self.product.product_id} "
                        f"(corrupt or truncated file?): {err}"
                    ) from err
            dn = cache[layer].copy()
            nodata = np.isnan(dn)
            gain = self.product.gains.get(layer, 1.0)
            if gain != 1.0:
                dn *= gain
            if feature not in AUX_BANDS:
                valid &= ~nodata
            dn[nodata] = 0.0
            # Offsets apply to reflectances only, looked up by band name (never by position).
            offset = 0.0 if feature in AUX_BANDS else self.product.offsets.get(layer, 0.0)
            out[i] = normalise(dn, offset, max_v)
        out[:, ~valid] = 0.0
        return out, valid
