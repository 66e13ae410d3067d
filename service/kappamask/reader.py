"""Windowed reads of a product's bands, resampled to the output grid and normalised.

Each band file is opened once and, for reads that walk down the grid strip by strip,
decoded once: whole rows of the file's blocks are kept until the strips have passed them
(a window that cuts through a JPEG 2000 tile makes GDAL decode that tile again for every
strip that touches it: three times the decoding of a full product). Resampling is
Lanczos (the windowed sinc of the paper) or bilinear, with no-data pixels (DN 0) kept out
of the kernel so the swath edge does not ring. A band is read in one of four ways,
cheapest first:

- already on the output grid: read as it is (a warp at identity changes no value);
- on a coarser grid of the same tile (20 m or 60 m onto 10 m): the window plus a kernel
  margin is read at native resolution and upsampled by ``kappamask.regrid``;
- on a finer grid of the same tile (10 m onto 20 m or 60 m): averaged over each output
  pixel by ``kappamask.regrid`` (an area mean whatever the chosen kernel);
- anything else (another CRS or origin, a ratio that is not an integer): a GDAL warped
  VRT.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from kappamask.bands import AUX_BANDS, BAND_SUBSTITUTES, DN_SCALE
from kappamask.errors import InvalidInputError, ProductError
from kappamask.gdal import GDAL_ENV, product_errors
from kappamask.grid import Grid
from kappamask.regrid import RADIUS, downsample, upsample
from kappamask.sources.product import Product

LOGGER = logging.getLogger(__name__)

RESAMPLING = {"lanczos": Resampling.lanczos, "bilinear": Resampling.bilinear}


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


def alignment(src: rasterio.io.DatasetReader, grid: Grid) -> int:
    """How a band file's grid relates to the output grid, which shares its origin.

    ``k > 1``: each band pixel covers k x k output pixels (upsample); ``1``: the same
    grid; ``-k``: each output pixel covers k x k band pixels (downsample); ``0``: not
    aligned (another CRS or origin, a non-integer ratio), so the warper resamples.
    """
    if src.crs is None or src.crs.to_string() != grid.crs:
        return 0
    t, g = src.transform, grid.transform
    coarser = t.a >= g.a
    factor = int(round(t.a / g.a) if coarser else round(g.a / t.a))
    scale = factor if coarser else 1.0 / factor
    same_origin = abs(t.c - g.c) < g.a * 1e-6 and abs(t.f - g.f) < g.a * 1e-6
    if factor < 1 or not same_origin:
        return 0
    if not t.almost_equals(Affine(g.a * scale, 0.0, g.c, 0.0, g.e * scale, g.f)):
        return 0
    if factor == 1 and (src.width, src.height) != (grid.width, grid.height):
        return 0
    return factor if coarser else -factor


class AlignedLayer:
    """A band file on a grid aligned with the output grid: its rows decoded once
    (BlockRows), then read as they are (factor 1), upsampled (k > 1) or averaged (-k)."""

    def __init__(self, src: rasterio.io.DatasetReader, factor: int, resampling: str) -> None:
        self.src, self.factor, self.resampling = src, factor, resampling
        self.rows = BlockRows(src)

    @property
    def decode_seconds(self) -> float:
        return self.rows.decode_seconds

    def read(self, window: Window) -> np.ndarray:
        """The window of the output grid as float32, NaN where there is no data."""
        factor, src = self.factor, self.src
        if factor == 1:
            return self.rows.read(window)
        out_rows = (int(window.row_off), int(window.row_off + window.height))
        out_cols = (int(window.col_off), int(window.col_off + window.width))
        if factor < 0:
            k = -factor
            row0, col0 = out_rows[0] * k, out_cols[0] * k
            row1 = min(out_rows[1] * k, src.height)
            col1 = min(out_cols[1] * k, src.width)
            fine = self.rows.read(Window(col0, row0, col1 - col0, row1 - row0))
            return downsample(fine, k, out_rows, out_cols, origin=(row0, col0))
        # Source pixels under the window plus the kernel's reach on either side.
        margin = RADIUS[self.resampling] + 1
        row0 = max(out_rows[0] // factor - margin, 0)
        col0 = max(out_cols[0] // factor - margin, 0)
        row1 = min(-(-out_rows[1] // factor) + margin, src.height)
        col1 = min(-(-out_cols[1] // factor) + margin, src.width)
        native = self.rows.read(Window(col0, row0, col1 - col0, row1 - row0))
        return upsample(native, factor, self.resampling, out_rows, out_cols, origin=(row0, col0))


class WarpedLayer:
    """Any other band file: GDAL's warper resamples it onto the output grid."""

    #: Decoding happens inside the warp, not counted apart.
    decode_seconds = 0.0

    def __init__(self, vrt: WarpedVRT) -> None:
        self.vrt = vrt

    def read(self, window: Window) -> np.ndarray:
        data: np.ndarray = self.vrt.read(1, window=window)
        return data


LayerSource = AlignedLayer | WarpedLayer


def open_layer(stack: ExitStack, path: str, grid: Grid, resampling: str) -> LayerSource:
    """The cheapest way to read the band file at ``path`` on ``grid`` (open in ``stack``)."""
    src = stack.enter_context(rasterio.open(path))
    factor = alignment(src, grid)
    if factor:
        return AlignedLayer(src, factor, resampling)
    return WarpedLayer(stack.enter_context(WarpedVRT(
        src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
        resampling=RESAMPLING[resampling], src_nodata=0, nodata=np.nan, dtype="float32",
    )))  # fmt: skip


class BandReader:
    """Reads normalised model features for windows of the output grid: each layer from its
    source (``open_layer``), assembled into the model's features.

    Use as a context manager; ``read(window)`` returns ``(features, valid)`` with
    ``features`` [C, h, w] of ``dtype`` (invalid pixels 0) and ``valid`` bool [h, w]: a
    pixel is valid where every spectral feature has data. The pipeline asks for float16,
    the precision the model receives, which halves a strip's memory.
    """

    def __init__(
        self,
        product: Product,
        features: Sequence[str],
        max_v: Sequence[float],
        grid: Grid,
        resampling: str = "lanczos",
        dtype: type[np.floating] = np.float32,
    ) -> None:
        if resampling not in RESAMPLING:
            raise InvalidInputError(f"resampling must be one of {sorted(RESAMPLING)}")
        if len(features) != len(max_v):
            raise ValueError("features and max_v differ in length")
        self.product = product
        self.features = tuple(features)
        self.max_v = tuple(float(v) for v in max_v)
        self.grid = grid
        self.resampling = resampling
        self.dtype = dtype
        self.layers = resolve_features(product, features)
        self._stack = ExitStack()
        self.sources: dict[str, LayerSource] = {}

    def __enter__(self) -> BandReader:
        self._stack.enter_context(self.product.rasterio_env(**GDAL_ENV))
        try:
            for layer in dict.fromkeys(self.layers.values()):
                with product_errors(f"open {layer} of {self.product.product_id}"):
                    path, _res = self.product.band_path(layer, int(self.grid.resolution))
                    self.sources[layer] = open_layer(self._stack, path, self.grid,
                                                     self.resampling)  # fmt: skip
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def decode_seconds(self) -> float:
        """Time spent decoding band files so far (warped reads decode inside the warp)."""
        return sum(source.decode_seconds for source in self.sources.values())

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Read ``window`` of the grid: normalised features and the validity mask."""
        h, w = int(window.height), int(window.width)
        out = np.zeros((len(self.features), h, w), dtype=self.dtype)
        valid = np.ones((h, w), dtype=bool)
        cache: dict[str, np.ndarray] = {}
        # A layer stays decoded only while a later feature (a substitute) still needs it.
        uses = Counter(self.layers.values())
        for i, (feature, max_v) in enumerate(zip(self.features, self.max_v, strict=True)):
            layer = self.layers[feature]
            if layer not in cache:
                with product_errors(f"decode {layer} of {self.product.product_id} "
                                    "(corrupt or truncated file?)"):  # fmt: skip
                    cache[layer] = self.sources[layer].read(window)
            uses[layer] -= 1
            dn = cache.pop(layer) if uses[layer] == 0 else cache[layer].copy()
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


class BlockRows:
    """Decoded rows of one band file, read in whole rows of its blocks and kept while needed.

    ``read(window)`` returns the window as float32 with NaN for DN 0. Rows are decoded
    across the full width of the file, so windows side by side on the same rows share
    them; rows above a window are dropped, so a top-to-bottom walk holds at most the
    rows under one strip plus one row of blocks, and every block is decoded once. A
    window above the kept rows decodes them again.
    """

    def __init__(self, src: rasterio.io.DatasetReader) -> None:
        self.src = src
        self.block_height = src.block_shapes[0][0]
        #: Seconds spent decoding, for the pipeline's stage timings.
        self.decode_seconds = 0.0
        self._top = 0
        self._data: np.ndarray = np.empty((0, src.width), dtype=src.dtypes[0])

    def read(self, window: Window) -> np.ndarray:
        row0, row1 = int(window.row_off), int(window.row_off + window.height)
        col0, col1 = int(window.col_off), int(window.col_off + window.width)
        kept_bottom = self._top + self._data.shape[0]
        bottom = min(-(-row1 // self.block_height) * self.block_height, self.src.height)
        if row0 < self._top or row0 >= kept_bottom:
            top = row0 // self.block_height * self.block_height
            self._data, self._top = self._decode(top, bottom), top
        elif row1 > kept_bottom:
            more = self._decode(kept_bottom, bottom)
            self._data = np.concatenate([self._data[row0 - self._top :], more])
            self._top = row0
        elif row0 > self._top:
            # A copy, so the rows above are freed rather than kept alive by a view.
            self._data = self._data[row0 - self._top :].copy()
            self._top = row0
        part = self._data[row0 - self._top : row1 - self._top, col0:col1]
        out = part.astype(np.float32)
        out[part == 0] = np.nan
        return out

    def _decode(self, top: int, bottom: int) -> np.ndarray:
        t0 = time.perf_counter()
        data: np.ndarray = self.src.read(1, window=Window(0, top, self.src.width, bottom - top))
        self.decode_seconds += time.perf_counter() - t0
        return data
