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


#: Elements per pass of ``normalise``: a chunk and its scratch stay in the core's cache
#: across the ten or so passes over it (scale, clip, round to float16).
CHUNK = 1 << 16
#: The largest finite float16; larger reflectances (none in a valid product) saturate.
HALF_MAX = 65504.0
#: float32 bits of the smallest normal float16 (2 ** -14), and what turns a float32 with
#: its mantissa rounded at bit 13 into float16 bits: the exponent rebiased from 127 to 15,
#: plus the round-half-up constant (modulo 2 ** 32, as uint32 arithmetic wraps).
_HALF_NORMAL_BITS = 0x38800000
_HALF_REBIAS = np.uint32((0x0FFF - ((127 - 15) << 23)) & 0xFFFFFFFF)


def normalise(
    dn: np.ndarray, offset: float, max_v: float, out: np.ndarray | None = None
) -> np.ndarray:
    """DESIGN §3: (DN + offset) / 65535 / max_v, negative results set to 0.

    In place in ``dn`` (float32, contiguous), or into ``out`` of the same shape, float32
    or float16. numpy 1.x casts float32 to float16 one element at a time (4-8 ns each: a
    third of a full product's reading); this rounds by integer arithmetic on the float32
    bits instead, to the same float16 as the cast (round half to even).
    """
    flat = dn.reshape(-1)
    scale = np.float32(1.0 / (DN_SCALE * max_v))
    half = out is not None and out.dtype == np.float16
    target = None if out is None else out.reshape(-1)
    scratch = np.empty(min(CHUNK, flat.size), dtype=np.uint32) if half else None
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start : start + CHUNK]
        chunk += np.float32(offset)
        chunk *= scale
        np.maximum(chunk, 0.0, out=chunk)
        if target is None:
            continue
        if not half:
            target[start : start + CHUNK] = chunk
            continue
        assert scratch is not None
        np.minimum(chunk, HALF_MAX, out=chunk)
        _store_half(chunk, target[start : start + CHUNK].view(np.uint16), scratch[: chunk.size])
    return dn if out is None else out


def _store_half(values: np.ndarray, bits_out: np.ndarray, scratch: np.ndarray) -> None:
    """float16 bits of non-negative finite float32 ``values`` <= HALF_MAX."""
    bits = values.view(np.uint32)
    # Round to nearest even at mantissa bit 13: add 0xFFF plus the bit that is kept last.
    np.right_shift(bits, 13, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    scratch += bits
    scratch += _HALF_REBIAS
    np.right_shift(scratch, 13, out=scratch)
    bits_out[...] = scratch
    subnormal = bits < _HALF_NORMAL_BITS
    if subnormal.any():  # below 2 ** -14, float16 counts in steps of 2 ** -24
        bits_out[subnormal] = np.rint(values[subnormal] * np.float32(2.0**24)).astype(np.uint16)


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
            dn = np.ascontiguousarray(dn, dtype=np.float32)
            nodata = np.isnan(dn)
            if nodata.any():
                dn[nodata] = 0.0
                if feature not in AUX_BANDS:
                    valid &= ~nodata
            gain = self.product.gains.get(layer, 1.0)
            if gain != 1.0:
                dn *= gain
            # Offsets apply to reflectances only, looked up by band name (never by position).
            offset = 0.0 if feature in AUX_BANDS else self.product.offsets.get(layer, 0.0)
            normalise(dn, offset, max_v, out=out[i])
        if not valid.all():
            out[:, ~valid] = 0.0
        return out, valid


class BlockRows:
    """Decoded rows of one band file, decoded block by block as windows first reach them
    and kept while needed.

    ``read(window)`` returns the window as float32 with NaN for DN 0. The kept rows span
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
        part = self._data[row0 - self._top : row1 - self._top, col0:col1]
        out = part.astype(np.float32)
        out[part == 0] = np.nan
        return out

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
