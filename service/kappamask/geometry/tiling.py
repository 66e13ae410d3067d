"""The crop grid over the output raster, crops with context at the raster's edges, and the
blended mosaic.

Crops are ``size`` pixels square and step by ``size - overlap``. The grid reaches at least
``overlap`` pixels past each edge of the raster (the slack split evenly between the two
ends); what lies outside the raster is filled by mirroring it (``with_context``), so the
outermost rows and columns sit as deep inside a crop as the interior does, instead of on
a crop's zero-padded border.

The mosaic is a weighted mean of the crops' per-class scores (``Blender``): a crop's
weight falls linearly over the last ``overlap`` pixels towards each of its edges, so two
neighbours cross-fade over their overlap (the weights sum to one) and no output pixel is
decided by a crop's border alone. Classes, confidence and cloud probability are then
decided from the blended scores by the rule the served graph applies to one crop
(``model_spec.decide``; here compiled into one pass). Rows are blended as the strips
finish, so memory stays that of one strip.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kappamask.bands import TILE_OVERLAP, TILE_SIZE, MaskClass
from kappamask.inference.model_spec import PROBABILITY_NODATA, SCORE_CLASSES
from kappamask.reading.compiled import kernel


@dataclass(frozen=True)
class Span:
    """One crop along one axis: its first pixel (negative before the raster) and size."""

    start: int
    size: int = TILE_SIZE

    @property
    def stop(self) -> int:
        return self.start + self.size

    def clip(self, length: int) -> tuple[int, int]:
        """The part of the crop inside a raster axis of ``length`` pixels."""
        return max(0, self.start), min(length, self.stop)


def spans(length: int, size: int = TILE_SIZE, overlap: int = TILE_OVERLAP) -> list[Span]:
    """Crop positions along an axis of ``length`` pixels: the fewest crops that reach
    ``overlap`` pixels past both ends, centred on the axis."""
    if length <= 0:
        raise ValueError("length must be positive")
    if not 0 <= overlap < size or overlap % 2:
        raise ValueError("overlap must be even and smaller than the crop size")
    step = size - overlap
    count = max(1, math.ceil((length + overlap) / step))
    reach = count * step + overlap
    first = -((reach - length) // 2)
    return [Span(first + i * step, size) for i in range(count)]


@dataclass(frozen=True)
class Crop:
    """A crop of the grid: its row/column index and its spans along y and x."""

    row: int
    col: int
    y: Span
    x: Span


@dataclass(frozen=True)
class CropGrid:
    """All crops of a ``height`` x ``width`` raster, by rows (the unit of streaming)."""

    height: int
    width: int
    size: int = TILE_SIZE
    overlap: int = TILE_OVERLAP

    @cached_property
    def rows(self) -> list[Span]:
        return spans(self.height, self.size, self.overlap)

    @cached_property
    def cols(self) -> list[Span]:
        return spans(self.width, self.size, self.overlap)

    @cached_property
    def profile(self) -> np.ndarray:
        """A crop's blending weight along one axis: 1 inside, falling linearly over the
        last ``overlap`` pixels towards each edge (never 0: a crop alone still counts)."""
        i = np.arange(self.size, dtype=np.float32)
        if not self.overlap:
            return np.ones(self.size, np.float32)
        edge = np.minimum(i, self.size - 1 - i)
        weights: np.ndarray = np.minimum(1.0, (edge + 0.5) / self.overlap).astype(np.float32)
        return weights

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def row_crops(self, row: int) -> list[Crop]:
        y = self.rows[row]
        return [Crop(row, c, y, x) for c, x in enumerate(self.cols)]

    def __iter__(self) -> Iterator[Crop]:
        for r in range(len(self.rows)):
            yield from self.row_crops(r)

    def boundaries(self) -> tuple[list[int], list[int]]:
        """Row and column boundaries (``b``: between pixels ``b - 1`` and ``b``) where a
        crop begins or ends inside the raster: where a cut mosaic would show its seams."""

        def edges(spans_: Sequence[Span], length: int) -> list[int]:
            found = {e for s in spans_ for e in (s.start, s.stop) if 0 < e < length}
            return sorted(found)

        return edges(self.rows, self.height), edges(self.cols, self.width)


@dataclass(frozen=True)
class Block:
    """The raster window read for a run of crops of one row: rows ``top:bottom`` and
    columns ``left:right`` (the crops' extent clipped to the raster)."""

    top: int
    bottom: int
    left: int
    right: int


def block_of(grid: CropGrid, crops: Sequence[Crop]) -> Block:
    """The raster window under ``crops`` (consecutive crops of one row)."""
    top, bottom = crops[0].y.clip(grid.height)
    left = crops[0].x.clip(grid.width)[0]
    right = crops[-1].x.clip(grid.width)[1]
    return Block(top, bottom, left, right)


def with_context(data: np.ndarray, block: Block, crops: Sequence[Crop]) -> np.ndarray:
    """``data`` [..., h, w] read for ``block``, extended to the crops' whole extent by
    mirroring it at the raster's edges (symmetric: the edge pixel repeats once)."""
    y, first, last = crops[0].y, crops[0].x, crops[-1].x
    pad = [
        (block.top - y.start, y.stop - block.bottom),
        (block.left - first.start, last.stop - block.right),
    ]
    if not any(a or b for a, b in pad):
        return data
    out: np.ndarray = np.pad(data, [(0, 0)] * (data.ndim - 2) + pad, mode="symmetric")
    return out


def cut(extended: np.ndarray, crop: Crop, crops: Sequence[Crop]) -> np.ndarray:
    """The crop's [..., size, size] from ``with_context``'s output for ``crops``."""
    x0 = crop.x.start - crops[0].x.start
    return extended[..., :, x0 : x0 + crop.x.size]


def has_data(valid: np.ndarray, block: Block, crop: Crop) -> bool:
    """Whether ``crop`` holds a pixel with data in ``valid`` (read for ``block``): the one
    rule for which crops go to the model (the service, the INT8 calibration and the
    benchmark's floors); the others, such as the no-data wedge, are never sent."""
    lo, hi = crop.x.start - block.left, crop.x.stop - block.left
    return bool(valid[:, max(0, lo) : max(0, hi)].any())


@kernel
def _accumulate(
    sums: np.ndarray,
    weights: np.ndarray,
    scores: np.ndarray,
    profile: np.ndarray,
    lo: int,
    hi: int,
    x0: int,
) -> None:
    """Add a crop's scores [classes, size, size], weighted by profile x profile, into
    raster columns ``lo:hi`` of ``sums`` (the crop's columns from ``x0``)."""
    for i in range(scores.shape[1]):
        wy = profile[i]
        for j in range(hi - lo):
            weights[i, lo + j] += wy * profile[x0 + j]
    for c in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            wy = profile[i]
            for j in range(hi - lo):
                sums[c, i, lo + j] += scores[c, i, x0 + j] * (wy * profile[x0 + j])


@kernel
def _decide_into(
    sums: np.ndarray,
    weights: np.ndarray,
    valid: np.ndarray,
    codes: np.ndarray,
    out: np.ndarray,
    missing: int,
    nodata: int,
) -> None:
    """``decide`` on the weighted means ``sums / weights``, in one pass, into ``out``
    [3, h, w] (classes, confidence, probability); no data where ``valid`` is False or no
    crop spoke. A pixel with data has a confidence of at least 1 (0 is the nodata)."""
    for i in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            w = weights[i, j]
            if w <= 0.0 or not valid[i, j]:
                out[0, i, j], out[1, i, j], out[2, i, j] = missing, 0, nodata
                continue
            best, top = 0, sums[0, i, j] / w
            for c in range(1, sums.shape[0]):
                v = sums[c, i, j] / w
                if v > top:
                    best, top = c, v
            free = max(sums[0, i, j], sums[1, i, j]) / w
            cloudy = max(sums[2, i, j], sums[3, i, j]) / w
            out[0, i, j] = codes[best]
            out[1, i, j] = max(1, int(np.rint(top)))
            out[2, i, j] = int(np.rint(100.0 * cloudy / max(cloudy + free, 1e-6)))


@dataclass
class Finished:
    """Finished rows of the mosaic: raster rows ``top`` on, their classes, confidence and
    cloud probability (uint8 [h, width] each)."""

    top: int
    classes: np.ndarray
    confidence: np.ndarray
    probability: np.ndarray


class Blender:
    """Weighted mean of overlapping crops' scores, one crop row at a time.

    ``add`` the crops of row ``r`` (any order), then ``finish(r, ...)``: it decides the
    raster rows that no later crop row reaches, and keeps the overlap with the next row.
    Crops that were never sent (no data) add nothing; where no crop covered a pixel,
    nothing is known (MISSING).
    """

    def __init__(self, grid: CropGrid):
        self.grid = grid
        self.sums = np.zeros((len(SCORE_CLASSES), grid.size, grid.width), np.float32)
        self.weights = np.zeros((grid.size, grid.width), np.float32)
        self.codes = np.array([int(c) for c in SCORE_CLASSES], np.uint8)

    def add(self, crop: Crop, scores: np.ndarray) -> None:
        """One crop's scores [classes, size, size] (uint8, x 255)."""
        lo, hi = crop.x.clip(self.grid.width)
        _accumulate(
            self.sums,
            self.weights,
            np.ascontiguousarray(scores),
            self.grid.profile,
            lo,
            hi,
            lo - crop.x.start,
        )

    def finish(self, row: int, valid: np.ndarray, valid_top: int) -> Finished:
        """Decide the rows row ``row`` finishes; ``valid``: whether pixels have data, for
        raster rows from ``valid_top`` (those of row ``row``'s crops)."""
        grid = self.grid
        y = grid.rows[row]
        last = row == len(grid.rows) - 1
        stop = grid.height if last else grid.rows[row + 1].start
        top = max(0, y.start)
        a, b = top - y.start, stop - y.start
        out = np.empty((3, b - a, grid.width), np.uint8)
        rows = valid[top - valid_top : stop - valid_top]
        _decide_into(
            self.sums[:, a:b],
            self.weights[a:b],
            rows,
            self.codes,
            out,
            int(MaskClass.MISSING),
            PROBABILITY_NODATA,
        )
        if not last:
            # the rows the next crop row also reaches move to the top, the rest is cleared
            step = grid.rows[row + 1].start - y.start
            self.sums[:, : grid.size - step] = self.sums[:, step:]
            self.sums[:, grid.size - step :] = 0
            self.weights[: grid.size - step] = self.weights[step:]
            self.weights[grid.size - step :] = 0
        return Finished(top, out[0], out[1], out[2])
