"""Cloud-Optimized GeoTIFFs of the result's rasters (class map, confidence, cloud
probability, usable-pixel mask).

The pipeline streams finished strips into a plain GeoTIFF (``StripWriter``, ZSTD at its
fastest level: written once, read once) and, as the strips come, halves them into one
scratch GeoTIFF per overview level by the raster's own rule: 'mode' for the class map (a
categorical raster must never be averaged; ties go to the higher, cloudier class),
'average' for the probability and the confidence, 'nearest' for the usable-pixel mask.
At the end ``to_cog`` hands the strips and their levels to GDAL's COG driver as one VRT,
which then only compresses: uint8, 512 px blocks, DEFLATE (what every COG reader
decodes), the raster's nodata and tags, the class colour table where there is one.
Building the overviews there instead, after the model has finished, was half of the COG
stage (measured on a full product on 2 cores: the four COGs in 3.5 s with the strips'
levels, 6.0 s with GDAL's). Without levels (a raster written out of order), the driver
builds them itself by the same rule. The driver compresses blocks on all cores;
rio-cogeo's translate, used before, built the overviews in a temporary file on one.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
from affine import Affine
from rasterio.shutil import copy
from rasterio.windows import Window

from kappamask.bands import CLASS_COLORS
from kappamask.geometry.grid import Grid
from kappamask.reading.compiled import inline_kernel, kernel
from kappamask.reading.gdal import COG_ENV

LOGGER = logging.getLogger(__name__)

OverviewResampling = Literal["mode", "average", "nearest"]
_RULES: dict[str, int] = {"nearest": 0, "mode": 1, "average": 2}

#: COG creation options of every raster the service writes (GDAL's COG driver).
BLOCK = 512
COG_OPTIONS: dict[str, str | int] = {
    "COMPRESS": "DEFLATE",
    # level 3 instead of 6: the four COGs of a 10980 px cloudy field in 2.45 s instead of
    # 3.18 s on 2 cores (level 1: 2.17 s), 1.2 % more bytes in all (202 MB; the class
    # map 6.8 MB instead of 4.8 MB)
    "LEVEL": 3,
    "BLOCKSIZE": BLOCK,
    "NUM_THREADS": "ALL_CPUS",
    "BIGTIFF": "IF_SAFER",
}
#: Scratch GeoTIFF compression: fast, and a tenth of the uncompressed size on disk.
SCRATCH_OPTIONS = {"compress": "ZSTD", "zstd_level": 1}


def overview_factors(width: int, height: int, block: int = BLOCK) -> list[int]:
    """The COG driver's overview levels: halved until a level fits in one block."""
    factors, factor = [], 1
    while max(-(-width // factor), -(-height // factor)) > block:
        factor *= 2
        factors.append(factor)
    return factors


def overview_path(path: Path, factor: int) -> Path:
    """Where ``StripWriter`` keeps the overview of ``path`` at ``factor``."""
    return path.with_name(f"{path.stem}.ovr{factor}{path.suffix}")


def scratch_files(path: Path) -> list[Path]:
    """A scratch raster and the overview levels written beside it."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.ovr*{path.suffix}"))]


@inline_kernel
def _pick(a: Any, b: Any, c: Any, d: Any, nodata: Any, rule: int) -> Any:
    """One 2 x 2 cell by ``rule`` (see ``_halve``), branch-free so that rows vectorise."""
    if rule == 0:
        return a
    va, vb, vc, vd = int(a != nodata), int(b != nodata), int(c != nodata), int(d != nodata)
    n = va + vb + vc + vd
    if rule == 2:
        total = int(a) * va + int(b) * vb + int(c) * vc + int(d) * vd
        mean = int((total + n // 2) * _INVERSE[n])  # exact for these small integers
        return mean if n else nodata
    # each value's count among the cell's values with data, then the highest (count, value)
    ab, ac, ad, bc, bd, cd = (
        int(a == b),
        int(a == c),
        int(a == d),
        int(b == c),
        int(b == d),
        int(c == d),
    )
    ka = (va * (1 + ab * vb + ac * vc + ad * vd)) * 256 + int(a)
    kb = (vb * (1 + ab * va + bc * vc + bd * vd)) * 256 + int(b)
    kc = (vc * (1 + ac * va + bc * vb + cd * vd)) * 256 + int(c)
    kd = (vd * (1 + ad * va + bd * vb + cd * vc)) * 256 + int(d)
    best = max(max(ka, kb), max(kc, kd))
    return best & 255 if n else nodata


#: 1 / n for the 0 to 4 values with data of a cell (slightly above, so floors are exact).
_INVERSE = np.array([0.0, 1.0, 0.5, 1.0 / 3.0 + 1e-12, 0.25])


@kernel
def _halve(rows: np.ndarray, nodata: int, rule: int, out: np.ndarray) -> None:  # pragma: no cover
    """One overview row per two of ``rows`` (the last may stand alone), one pixel per 2 x 2
    cell: its top-left pixel (rule 0), the most frequent value with data, ties to the
    higher (1), or the rounded mean of the values with data (2); nodata where a cell has
    none (rules 1 and 2). Beyond the last row or column, a cell's pixels are nodata."""
    height, width = rows.shape
    for i in range(out.shape[0]):
        r0, r1 = 2 * i, min(2 * i + 1, height - 1)
        full_row = r1 > r0
        for j in range(width // 2):
            c, d = (rows[r1, 2 * j], rows[r1, 2 * j + 1]) if full_row else (nodata, nodata)
            out[i, j] = _pick(rows[r0, 2 * j], rows[r0, 2 * j + 1], c, d, nodata, rule)
        if width % 2:
            j = width // 2
            c = rows[r1, 2 * j] if full_row else nodata
            out[i, j] = _pick(rows[r0, 2 * j], nodata, c, nodata, nodata, rule)


class StripWriter:
    """A scratch single-band uint8 GeoTIFF on ``grid`` that takes rows as they finish, and,
    with ``overviews``, builds its overview levels from them (rows in order, top down)."""

    def __init__(
        self,
        path: Path,
        grid: Grid,
        colormap: bool = False,
        nodata: int = 0,
        overviews: OverviewResampling | None = None,
    ) -> None:
        self.path = path
        self.grid = grid
        self.colormap = colormap
        self.nodata = nodata
        self.overviews = overviews
        self._dst: rasterio.io.DatasetWriter | None = None
        #: Overview levels: their writers, and per level (the full rows first) the rows
        #: not halved yet and the next row to write.
        self._levels: list[rasterio.io.DatasetWriter] = []
        self._carry: list[np.ndarray] = []
        self._next: list[int] = []

    def _open(self, path: Path, width: int, height: int, factor: int) -> rasterio.io.DatasetWriter:
        # the overview's pixels are ``factor`` times larger, from the same corner
        transform = self.grid.transform @ Affine.scale(factor)
        return rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=width,
            height=height,
            count=1,
            dtype="uint8",
            crs=self.grid.crs,
            transform=transform,
            nodata=self.nodata,
            tiled=True,
            blockxsize=BLOCK,
            blockysize=BLOCK,
            **SCRATCH_OPTIONS,
        )

    def __enter__(self) -> StripWriter:
        width, height = self.grid.width, self.grid.height
        self._dst = self._open(self.path, width, height, 1)
        if self.colormap:
            # On the scratch file already, so the COG's overviews are built on a palette band.
            self._dst.write_colormap(1, dict(CLASS_COLORS))
        if self.overviews is not None:
            for factor in overview_factors(width, height):
                path = overview_path(self.path, factor)
                self._levels.append(
                    self._open(path, -(-width // factor), -(-height // factor), factor)
                )
            self._carry = [
                np.empty((0, -(-width // 2**k)), np.uint8) for k in range(len(self._levels))
            ]
            self._next = [0] * (len(self._levels) + 1)
        return self

    def write(self, row_start: int, rows: np.ndarray) -> None:
        """Write ``rows`` [h, width] starting at grid row ``row_start``."""
        assert self._dst is not None
        self._dst.write(rows, 1, window=Window(0, row_start, rows.shape[1], rows.shape[0]))
        if not self._levels:
            return
        if row_start != self._next[0]:
            raise ValueError(
                f"overviews are built from rows in order: row {self._next[0]} "
                f"expected, not {row_start}"
            )
        self._next[0] += rows.shape[0]
        self._halve_into(0, rows, last=self._next[0] == self.grid.height)

    def _halve_into(self, level: int, rows: np.ndarray, last: bool) -> None:
        """Add ``rows`` of ``level`` (0: full resolution) and write what they complete of
        the next level, and so on down."""
        pending = np.concatenate([self._carry[level], rows]) if self._carry[level].size else rows
        usable = pending.shape[0] if last else pending.shape[0] // 2 * 2
        self._carry[level] = pending[usable:].copy()
        if usable == 0:
            return
        target = self._levels[level]
        out = np.empty((-(-usable // 2), target.width), dtype=np.uint8)
        assert self.overviews is not None
        _halve(np.ascontiguousarray(pending[:usable]), self.nodata, _RULES[self.overviews], out)
        top = self._next[level + 1]
        target.write(out, 1, window=Window(0, top, out.shape[1], out.shape[0]))
        self._next[level + 1] += out.shape[0]
        if level + 1 < len(self._levels):
            self._halve_into(level + 1, out, last)

    def __exit__(self, *exc_info: object) -> None:
        for dst in (self._dst, *self._levels):
            if dst is not None:
                dst.close()


def to_cog(
    src: Path,
    dst: Path,
    tags: dict[str, str] | None = None,
    overviews: OverviewResampling = "mode",
) -> None:
    """Rewrite the scratch GeoTIFF ``src`` as a COG at ``dst`` (its nodata and colour table
    kept), with the overview levels ``StripWriter`` built beside it, or else overviews
    resampled by ``overviews``."""
    with rasterio.Env(**COG_ENV):
        with rasterio.open(src) as ds:
            factors = overview_factors(ds.width, ds.height)
            levels = [overview_path(src, f) for f in factors]
            if not all(level.exists() for level in levels):
                levels = []
            vrt = src.with_suffix(".vrt")
            vrt.write_text(_vrt(ds, src, levels, tags or {}))
        try:
            options = (
                {"OVERVIEWS": "FORCE_USE_EXISTING"}
                if levels
                else {"OVERVIEW_RESAMPLING": overviews.upper()}
            )
            copy(vrt, dst, driver="COG", **options, **COG_OPTIONS)
        finally:
            vrt.unlink()
    LOGGER.debug("wrote %s", dst)


def _vrt(
    ds: rasterio.io.DatasetReader, path: Path, levels: list[Path], tags: dict[str, str]
) -> str:
    """A VRT of the scratch raster ``ds`` at ``path``: its band with ``tags``, nodata,
    colour table and the overview ``levels``."""
    root = ET.Element("VRTDataset", rasterXSize=str(ds.width), rasterYSize=str(ds.height))
    ET.SubElement(root, "SRS").text = ds.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in ds.transform.to_gdal())
    metadata = ET.SubElement(root, "Metadata")
    for key, value in {**ds.tags(), **tags}.items():
        ET.SubElement(metadata, "MDI", key=key).text = value
    band = ET.SubElement(root, "VRTRasterBand", dataType="Byte", band="1")
    if ds.nodata is not None:
        ET.SubElement(band, "NoDataValue").text = repr(float(ds.nodata))
    try:
        colours = ds.colormap(1)
    except ValueError:  # no colour table
        colours = None
    if colours:
        ET.SubElement(band, "ColorInterp").text = "Palette"
        table = ET.SubElement(band, "ColorTable")
        for index in range(max(colours) + 1):
            rgba = colours.get(index, (0, 0, 0, 0))
            ET.SubElement(
                table, "Entry", c1=str(rgba[0]), c2=str(rgba[1]), c3=str(rgba[2]), c4=str(rgba[3])
            )

    def source(parent: ET.Element, tag: str, file: Path) -> None:
        element = ET.SubElement(parent, tag)
        ET.SubElement(element, "SourceFilename", relativeToVRT="1").text = file.name
        ET.SubElement(element, "SourceBand").text = "1"

    source(band, "SimpleSource", path)
    for level in levels:
        source(band, "Overview", level)
    return ET.tostring(root, encoding="unicode")
