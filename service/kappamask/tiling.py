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
decided from the blended scores (``decide``) by the rule the served graph applies to one
crop. Rows are blended as the strips finish, so memory stays that of one strip.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kappamask.bands import TILE_OVERLAP, TILE_SIZE, MaskClass
from kappamask.inference.model_spec import PROBABILITY_NODATA, SCORE_CLASSES, decide


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
    pad = [(block.top - y.start, y.stop - block.bottom), (block.left - first.start,
                                                          last.stop - block.right)]  # fmt: skip
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


@dataclass
class Blended:
    """Finished rows of the mosaic: raster rows ``top`` to ``top + len``, the blended
    scores [4, h, width] and where any crop covered them."""

    top: int
    scores: np.ndarray
    covered: np.ndarray


class Blender:
    """Weighted mean of overlapping crops' scores, one crop row at a time.

    ``add`` the crops of row ``r`` (any order), then ``finish(r)``: it returns the raster
    rows that no later crop row reaches, and keeps the overlap with the next row. Crops
    that were never sent (no data) add nothing; where no crop covered a pixel, nothing
    is known (``covered`` False).
    """

    def __init__(self, grid: CropGrid, classes: int = len(SCORE_CLASSES)):
        self.grid = grid
        width = grid.width
        self.sums = np.zeros((classes, grid.size, width), np.float32)
        self.weights = np.zeros((grid.size, width), np.float32)

    def add(self, crop: Crop, scores: np.ndarray) -> None:
        """One crop's scores [classes, size, size] (uint8 or float)."""
        lo, hi = crop.x.clip(self.grid.width)
        x0, x1 = lo - crop.x.start, hi - crop.x.start
        profile = self.grid.profile
        weight = profile[:, None] * profile[None, x0:x1]
        self.sums[:, :, lo:hi] += scores[:, :, x0:x1] * weight
        self.weights[:, lo:hi] += weight

    def finish(self, row: int) -> Blended:
        grid = self.grid
        y = grid.rows[row]
        last = row == len(grid.rows) - 1
        stop = grid.height if last else grid.rows[row + 1].start
        a, b = max(0, y.start) - y.start, stop - y.start
        weights = self.weights[a:b]
        covered = weights > 0
        scores = self.sums[:, a:b] / np.maximum(weights, 1e-12)
        done = Blended(max(0, y.start), scores, covered)
        if not last:
            # the rows the next crop row also reaches move to the top, the rest is cleared
            step = grid.rows[row + 1].start - y.start
            self.sums[:, : grid.size - step] = self.sums[:, step:]
            self.sums[:, grid.size - step :] = 0
            self.weights[: grid.size - step] = self.weights[step:]
            self.weights[grid.size - step :] = 0
        return done


def finished_planes(done: Blended, valid: np.ndarray) -> tuple[np.ndarray, ...]:
    """The classes, confidence and probability of finished rows; MISSING, 0 and
    ``PROBABILITY_NODATA`` where ``valid`` (the same rows) has no data or no crop spoke."""
    classes, confidence, probability = decide(done.scores)
    known = valid & done.covered
    classes[~known] = MaskClass.MISSING
    confidence[~known] = 0
    probability[~known] = PROBABILITY_NODATA
    # A pixel with data always has some confidence; 0 is the nodata value.
    np.maximum(confidence, known.astype(np.uint8), out=confidence)
    return classes, confidence, probability
