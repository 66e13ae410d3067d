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
  margin is read at native resolution and upsampled by ``kappamask.reading.regrid``;
- on a finer grid of the same tile (10 m onto 20 m or 60 m): averaged over each output
  pixel by ``kappamask.reading.regrid`` (an area mean whatever the chosen kernel);
- anything else (another CRS or origin, a ratio that is not an integer): a GDAL warped
  VRT.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from kappamask.bands import AUX_BANDS, BAND_SUBSTITUTES, DN_SCALE
from kappamask.errors import ProductError
from kappamask.geometry.grid import Grid
from kappamask.inference.model_spec import OFFSET_KM_PREDICT, OFFSET_TRAINING
from kappamask.reading.compiled import inline_kernel, kernel
from kappamask.reading.gdal import GDAL_ENV, open_band, product_errors
from kappamask.reading.regrid import RADIUS, downsample, upsample
from kappamask.sources.product import Product

LOGGER = logging.getLogger(__name__)

#: rasterio's resampling of each of RunOptions' methods (kappamask.options.RESAMPLING_METHODS,
#: which checks the user's choice).
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


#: The largest finite float16; larger reflectances (none in a valid product) saturate.
HALF_MAX = 65504.0
#: float32 bits of the smallest normal float16 (2 ** -14), and what turns a float32 with
#: its mantissa rounded at bit 13 into float16 bits: the exponent rebiased from 127 to 15.
_HALF_NORMAL_BITS = 0x38800000
_HALF_REBIAS = (127 - 15) << 23


@inline_kernel
def _scaled(x: Any, zero_is_nodata: bool, gain: float, offset: float, scale: float) -> Any:
    """ARCHITECTURE.md §3 for one pixel (float32 arithmetic); NaN where there is no data."""
    v = np.float32(x)
    if v != v or (zero_is_nodata and v == 0):
        return np.float32(np.nan)
    v = (v * np.float32(gain) + np.float32(offset)) * np.float32(scale)
    return max(v, np.float32(0.0))


@inline_kernel
def _half_bits(v: Any) -> Any:
    """float16 bits of a finite float32 ``v`` >= 0, rounded to nearest even as numpy's cast
    rounds."""
    v = min(v, np.float32(HALF_MAX))
    b = np.uint32(np.float32(v).view(np.uint32))
    if b < _HALF_NORMAL_BITS:  # below 2 ** -14 float16 counts in steps of 2 ** -24
        return np.uint16(np.rint(v * np.float32(2.0**24)))
    # round at mantissa bit 13: add 0xFFF plus the bit that is kept last
    b = b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1))
    return np.uint16((b - np.uint32(_HALF_REBIAS)) >> np.uint32(13))


@kernel
def _normalise_into(
    data: np.ndarray,
    zero_is_nodata: bool,
    gain: float,
    offset: float,
    scale: float,
    half: bool,
    out: np.ndarray,
    valid: np.ndarray,
    mark: bool,
) -> None:  # pragma: no cover - compiled
    """``_scaled`` into ``out``: float16 bits (``half``, ``out`` uint16) or float32."""
    rows, cols = data.shape
    for r in range(rows):
        for c in range(cols):
            v = _scaled(data[r, c], zero_is_nodata, gain, offset, scale)
            if v != v:
                out[r, c] = 0
                if mark:
                    valid[r, c] = False
            elif half:
                out[r, c] = _half_bits(v)
            else:
                out[r, c] = v


def normalise(
    data: np.ndarray,
    offset: float,
    max_v: float,
    out: np.ndarray,
    gain: float = 1.0,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """ARCHITECTURE.md §3: (DN * gain + offset) / 65535 / max_v, negative results set to 0, into
    ``out`` (float32 or float16, the shape of ``data``); returns ``out``.

    ``data`` holds DN as read (integers, 0 = no data) or resampled (float, NaN = no
    data); no-data pixels get 0 and, when ``valid`` is given, are cleared in it. One
    compiled pass per pixel: as numpy passes (convert, mark no data, offset, scale, clip,
    round to float16 by integer arithmetic, as numpy 1.x casts float32 to float16 one
    element at a time) this was a third of a full product's reading.
    """
    if out.shape != data.shape or out.dtype not in (np.float16, np.float32):
        raise ValueError("out must be float16 or float32 of the data's shape")

    def two_d(a: np.ndarray) -> np.ndarray:
        return a.reshape(1, -1) if a.ndim == 1 else a

    zero_is_nodata = data.dtype.kind in "ui"
    mark = valid is not None
    flags = two_d(valid) if valid is not None else np.ones((1, 1), dtype=bool)
    args = (two_d(data), zero_is_nodata, float(gain), float(offset), 1.0 / (DN_SCALE * max_v))
    half = out.dtype == np.float16
    _normalise_into(*args, half, two_d(out.view(np.uint16) if half else out), flags, mark)
    return out


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
        """The window of the output grid: the DN as stored (0 = no data) where the band is
        on the output grid, else float32 with NaN where there is no data."""
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
            fine = _with_nan(self.rows.read(Window(col0, row0, col1 - col0, row1 - row0)))
            return downsample(fine, k, out_rows, out_cols, origin=(row0, col0))
        # Source pixels under the window plus the kernel's reach on either side.
        margin = RADIUS[self.resampling] + 1
        row0 = max(out_rows[0] // factor - margin, 0)
        col0 = max(out_cols[0] // factor - margin, 0)
        row1 = min(-(-out_rows[1] // factor) + margin, src.height)
        col1 = min(-(-out_cols[1] // factor) + margin, src.width)
        native = _with_nan(self.rows.read(Window(col0, row0, col1 - col0, row1 - row0)))
        return upsample(native, factor, self.resampling, out_rows, out_cols, origin=(row0, col0))


def _with_nan(dn: np.ndarray) -> np.ndarray:
    """DN as float32, NaN where 0 (no data)."""
    out = dn.astype(np.float32)
    out[dn == 0] = np.nan
    return out


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
    src = stack.enter_context(open_band(path))
    factor = alignment(src, grid)
    if factor:
        return AlignedLayer(src, factor, resampling)
    return WarpedLayer(
        stack.enter_context(
            WarpedVRT(
                src,
                **grid.warp,
                resampling=RESAMPLING[resampling],
                src_nodata=0,
                nodata=np.nan,
                dtype="float32",
            )
        )
    )


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
        offset_rule: str = OFFSET_TRAINING,
    ) -> None:
        if len(features) != len(max_v):
            raise ValueError("features and max_v differ in length")
        self.product = product
        self.features = tuple(features)
        self.max_v = tuple(float(v) for v in max_v)
        self.grid = grid
        self.resampling = resampling
        self.dtype = dtype
        self.offset_rule = offset_rule
        self.layers = resolve_features(product, features)
        self._stack = ExitStack()
        self.sources: dict[str, LayerSource] = {}

    def __enter__(self) -> BandReader:
        self._stack.enter_context(self.product.rasterio_env(**GDAL_ENV))
        try:
            for layer in dict.fromkeys(self.layers.values()):
                with product_errors(f"open {layer} of {self.product.product_id}"):
                    path, _res = self.product.band_path(layer, int(self.grid.resolution))
                    self.sources[layer] = open_layer(self._stack, path, self.grid, self.resampling)
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
        out = np.empty((len(self.features), h, w), dtype=self.dtype)
        valid = np.ones((h, w), dtype=bool)
        cache: dict[str, np.ndarray] = {}
        # A layer stays read only while a later feature (a substitute) still needs it.
        uses = Counter(self.layers.values())
        for i, (feature, max_v) in enumerate(zip(self.features, self.max_v, strict=True)):
            layer = self.layers[feature]
            if layer not in cache:
                with product_errors(
                    f"decode {layer} of {self.product.product_id} (corrupt or truncated file?)"
                ):
                    cache[layer] = self.sources[layer].read(window)
            uses[layer] -= 1
            data = cache.pop(layer) if uses[layer] == 0 else cache[layer]
            # Offsets apply to reflectances only, looked up by band name (never by position);
            # so does the validity: an auxiliary layer's gaps do not make a pixel unusable.
            aux = feature in AUX_BANDS
            offset = 0.0 if aux else self.product.offsets.get(layer, 0.0)
            if self.offset_rule == OFFSET_KM_PREDICT:  # the served model's contract
                if self.product.level == "L2A":
                    offset = 0.0
                else:
                    max_v = max_v + offset / DN_SCALE
            normalise(
                data,
                offset,
                max_v,
                out=out[i],
                gain=self.product.gains.get(layer, 1.0),
                valid=None if aux else valid,
            )
        if not valid.all():
            out[:, ~valid] = 0.0
        return out, valid


class BlockRows:
    """Decoded rows of one band file, decoded block by block as windows first reach them
    and kept while needed.

    ``read(window)`` returns the window's DN as stored (a view: use it before the next
    read). The kept rows span
    the file's full width, and each of its blocks (a JPEG 2000 tile) is decoded the first
    time a window touches it, together with the other undecoded blocks that window
    touches (GDAL decodes them on all cores). Windows side by side on the same rows share
    the blocks; rows above a window are dropped, so a top-to-bottom walk holds at most the
    rows under one strip plus one row of blocks, and every block is decoded once. Decoding
    a block row a few blocks at a time, as the chunks of a strip reach them, keeps the
    model fed in between: decoding whole rows of blocks at once left it idle for 1-2 s
    every 1024 rows (measured: 0.5 of 2 cores idle at each JPEG 2000 block row).
    A window above the kept rows decodes them again.
    """

    def __init__(self, src: rasterio.io.DatasetReader) -> None:
        self.src = src
        self.block_height, self.block_width = src.block_shapes[0]
        #: Seconds spent decoding, for the pipeline's stage timings.
        self.decode_seconds = 0.0
        self._top = 0
        self._data: np.ndarray = np.empty((0, src.width), dtype=src.dtypes[0])
        #: Per block row (by index in the file) kept, which of its blocks are decoded.
        self._decoded: dict[int, np.ndarray] = {}

    def read(self, window: Window) -> np.ndarray:
        row0, row1 = int(window.row_off), int(window.row_off + window.height)
        col0, col1 = int(window.col_off), int(window.col_off + window.width)
        self._keep(row0, row1)
        bh, bw = self.block_height, self.block_width
        for block_row in range(row0 // bh, -(-row1 // bh)):
            decoded = self._decoded[block_row]
            first, last = col0 // bw, -(-col1 // bw)
            missing = np.flatnonzero(~decoded[first:last]) + first
            # runs of undecoded blocks side by side: one read each, decoded in parallel
            for run in np.split(missing, np.flatnonzero(np.diff(missing) > 1) + 1):
                if run.size:
                    top = max(block_row * bh, self._top)
                    bottom = min((block_row + 1) * bh, self.src.height)
                    left, right = int(run[0]) * bw, min(int(run[-1] + 1) * bw, self.src.width)
                    self._decode(top, bottom, left, right)
                    decoded[run] = True
        return self._data[row0 - self._top : row1 - self._top, col0:col1]

    def _keep(self, row0: int, row1: int) -> None:
        """Hold rows ``row0`` to the end of the block row of ``row1 - 1``; drop those above."""
        bh = self.block_height
        kept_bottom = self._top + self._data.shape[0]
        bottom = min(-(-row1 // bh) * bh, self.src.height)
        if row0 < self._top or row0 >= kept_bottom:
            self._top = row0
            self._data = np.empty((0, self.src.width), dtype=self._data.dtype)
            self._decoded = {}
            kept_bottom = row0
        elif row0 > self._top:
            # A copy, so the rows above are freed rather than kept alive by a view.
            self._data = self._data[row0 - self._top :].copy()
            self._top = row0
            self._decoded = {b: d for b, d in self._decoded.items() if (b + 1) * bh > row0}
        if bottom > kept_bottom:
            more = np.empty((bottom - kept_bottom, self.src.width), dtype=self._data.dtype)
            self._data = np.concatenate([self._data, more]) if self._data.size else more
        blocks = -(-self.src.width // self.block_width)
        for block_row in range(self._top // bh, -(-bottom // bh)):
            self._decoded.setdefault(block_row, np.zeros(blocks, dtype=bool))

    def _decode(self, top: int, bottom: int, left: int, right: int) -> None:
        """Decode rows ``top:bottom``, columns ``left:right`` of the file into the kept rows."""
        t0 = time.perf_counter()
        window = Window(left, top, right - left, bottom - top)
        rows = slice(top - self._top, bottom - self._top)
        self._data[rows, left:right] = self.src.read(1, window=window)
        self.decode_seconds += time.perf_counter() - t0
