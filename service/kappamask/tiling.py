"""The crop grid over the output raster, crop extraction with zero padding, and the mosaic.

Crops are ``size`` pixels square and step by ``size - overlap``; the last crop of a row
or column runs past the raster and is zero-padded. In the mosaic every crop gives only
its centre: ``overlap // 2`` pixels are dropped on each side that has a neighbour, so
every output pixel comes from exactly one crop and never from a crop's border.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kappamask.bands import TILE_OVERLAP, TILE_SIZE


@dataclass(frozen=True)
class Span:
    """One crop along one axis: where it starts and which part of it the mosaic keeps."""

    start: int
    keep_start: int
    keep_stop: int


def spans(length: int, size: int = TILE_SIZE, overlap: int = TILE_OVERLAP) -> list[Span]:
    """Crop positions along an axis of ``length`` pixels."""
    if length <= 0:
        raise ValueError("length must be positive")
    if not 0 <= overlap < size or overlap % 2:
        raise ValueError("overlap must be even and smaller than the crop size")
    step = size - overlap
    count = max(1, math.ceil((length - overlap) / step))
    half = overlap // 2
    out = []
    for i in range(count):
        start = i * step
        keep_start = start + (half if i > 0 else 0)
        keep_stop = min(length, start + size - (half if i < count - 1 else 0))
        out.append(Span(start, keep_start, keep_stop))
    return out


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

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def row_crops(self, row: int) -> list[Crop]:
        y = self.rows[row]
        return [Crop(row, c, y, x) for c, x in enumerate(self.cols)]

    def __iter__(self) -> Iterator[Crop]:
        for r in range(len(self.rows)):
            yield from self.row_crops(r)


def extract(strip: np.ndarray, x: Span, size: int = TILE_SIZE) -> np.ndarray:
    """Cut the crop starting at column ``x.start`` from a strip [..., h, w], zero-padded
    to ``size`` x ``size`` at the bottom and right."""
    part = strip[..., :size, x.start : x.start + size]
    pad_h, pad_w = size - part.shape[-2], size - part.shape[-1]
    if pad_h or pad_w:
        pad = [(0, 0)] * (part.ndim - 2) + [(0, pad_h), (0, pad_w)]
        part = np.pad(part, pad)
    return part


def has_data(valid: np.ndarray, x: Span) -> bool:
    """Whether the crop at column ``x.start`` of a strip's validity mask has a pixel with
    data: the one rule for which crops go to the model (the service, the INT8 calibration
    and the benchmark's floors); the others, such as the no-data wedge, are never sent."""
    return bool(extract(valid, x).any())


def place(target: np.ndarray, crop_out: np.ndarray, crop: Crop, strip_top: int) -> None:
    """Write the kept centre of a crop's output [size, size] into a strip [h, width]
    whose first row is grid row ``strip_top``."""
    y0, y1 = crop.y.keep_start - crop.y.start, crop.y.keep_stop - crop.y.start
    x0, x1 = crop.x.keep_start - crop.x.start, crop.x.keep_stop - crop.x.start
    ty = crop.y.keep_start - strip_top
    target[ty : ty + (y1 - y0), crop.x.keep_start : crop.x.keep_stop] = crop_out[y0:y1, x0:x1]
