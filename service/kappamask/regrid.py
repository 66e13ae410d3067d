"""Integer-factor resampling between grids of one tile that share their origin.

Sentinel-2 grids of one tile share the upper-left corner and differ by the factors 2, 3
and 6. Upsampling (a 20 m or 60 m band onto 10 m) is a separable filter with one fixed
set of taps per output phase; it gives the values of GDAL's warper (Lanczos or bilinear,
no-data kept out of the kernel, weights renormalised over the valid taps) at a fraction
of its cost: the warper evaluates the kernel per output pixel on one thread, which made
it the slowest stage of a full 10 m product. Downsampling (a 10 m band onto 20 m or
60 m) is the mean of the valid fine pixels under each coarse one: the area aggregate of
the reflectance, where the warper's Lanczos spends 36 x 36 taps per pixel (four minutes
for the 10 m bands of one product at 60 m).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from threadpoolctl import threadpool_limits

#: Support of each kernel in source pixels on either side of the sample point.
RADIUS = {"lanczos": 3, "bilinear": 1}
#: Below this summed weight GDAL's warper writes no data; so do we.
MIN_WEIGHT = 1e-6


def _kernel(name: str, x: np.ndarray) -> np.ndarray:
    if name == "bilinear":
        tent: np.ndarray = np.maximum(0.0, 1.0 - np.abs(x))
        return tent
    radius = RADIUS["lanczos"]
    weights = np.sinc(x) * np.sinc(x / radius)
    weights[np.abs(x) >= radius] = 0.0
    return weights


def phase_taps(factor: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """Per output phase, the first source offset and the tap weights.

    Output pixel ``j = factor * q + p`` has its centre at source coordinate
    ``(j + 0.5) / factor`` (pixel corners at integers); it is filtered from source pixels
    ``q + first[p] + t`` for ``t`` in ``range(taps)`` with weights ``weights[p, t]``.
    """
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, not {factor}")
    radius = RADIUS[kernel]
    offsets = np.arange(1 - radius, radius + 1)
    first = np.empty(factor, dtype=np.int64)
    weights = np.empty((factor, offsets.size), dtype=np.float64)
    for p in range(factor):
        centre = (p + 0.5) / factor - 0.5
        base = math.floor(centre)
        first[p] = base + offsets[0]
        weights[p] = _kernel(kernel, offsets - (centre - base))
    return first, weights


#: Output pixels per matrix product: a block's source rows stay in the core's cache and
#: the products run in BLAS, 3x faster than one array pass per tap.
BLOCK = 64


@cache
def _block_matrix(factor: int, kernel: str) -> tuple[int, np.ndarray]:
    """The upsampling of one block of ``BLOCK // factor`` source pixels as a matrix.

    Returns ``(lead, matrix)``: output pixels ``factor * q0 + m`` for ``m`` in
    ``range(block)`` are ``source[q0 + lead : q0 + lead + K] @ matrix`` ([K, block]); the
    same matrix serves every block, as every block starts at phase 0. Each phase's taps
    are scaled to sum to 1, so away from no data and the edges the result needs no
    renormalisation (``upsample`` divides by the filtered weights anyway).
    """
    first, weights = phase_taps(factor, kernel)
    weights = weights / weights.sum(axis=1, keepdims=True)
    block = factor * max(1, BLOCK // factor)
    taps = weights.shape[1]
    lead = int(first.min())
    span = (block // factor - 1) + int(first.max()) - lead + taps
    matrix = np.zeros((span, block), dtype=np.float32)
    for m in range(block):
        q, p = divmod(m, factor)
        row = q + int(first[p]) - lead
        matrix[row : row + taps, m] = weights[p]
    return lead, matrix


# The products are small: one core does each in a few ms, and OpenBLAS's other threads
# would spin between them on the cores the JPEG 2000 decoder and the model need (measured
# on 2 cores: 15 more core-seconds of a 10980 px product with two BLAS threads than one).
threadpool_limits(1, user_api="blas")


def _upsample_axis(
    data: np.ndarray, factor: int, kernel: str, start: int, size: int, axis: int
) -> np.ndarray:
    """Filter ``data`` along ``axis`` (0 or 1) onto ``size`` output pixels from output
    index ``start``.

    ``data`` covers source indices ``0..n-1`` of that axis; taps outside it count as zero.
    Output pixels go block by block (``_block_matrix``), each one matrix product.
    """
    lead, matrix = _block_matrix(factor, kernel)
    span, block = matrix.shape
    if data.ndim == 1:
        return _upsample_axis(data[:, None], factor, kernel, start, size, 0)[:, 0]
    first_block = start - start % factor
    last_block = first_block + (start + size - first_block - 1) // block * block
    # Zero padding so that every block's source slice lies inside the array.
    before = max(0, -(first_block // factor + lead))
    after = max(0, last_block // factor + lead + span - data.shape[axis])
    pad = [(0, 0)] * data.ndim
    pad[axis] = (before, after)
    padded = np.pad(data, pad) if before or after else data
    shape = list(data.shape)
    shape[axis] = size
    out = np.empty(shape, dtype=np.float32)
    for b0 in range(first_block, start + size, block):
        s0 = b0 // factor + lead + before
        o0, o1 = max(b0, start), min(b0 + block, start + size)
        if axis == 0:
            out[o0 - start : o1 - start] = (matrix.T @ padded[s0 : s0 + span])[o0 - b0 : o1 - b0]
        else:
            out[:, o0 - start : o1 - start] = (padded[:, s0 : s0 + span] @ matrix)[
                :, o0 - b0 : o1 - b0
            ]
    return out


def upsample(
    source: np.ndarray,
    factor: int,
    kernel: str,
    rows: tuple[int, int],
    cols: tuple[int, int],
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Upsample a window of a band by an integer ``factor``, no-data kept out.

    ``source`` holds source pixels from ``origin`` (row, col) on, NaN where there is no
    data; pixels beyond it count as no data, so the caller passes ``RADIUS`` source pixels
    of margin around the window wherever the band has them. ``rows`` and ``cols`` are the
    half-open output window on the fine grid. Returns float32 with NaN where no valid tap
    carries weight or where the source pixel under the output pixel has no data, so
    no-data areas never shrink (GDAL's warper blanks a few more edge pixels than this).
    """
    valid = ~np.isnan(source)
    all_valid = bool(valid.all())
    values = source if all_valid else np.where(valid, source, np.float32(0.0))
    values = values.astype(np.float32, copy=False)
    out_rows = (rows[0] - origin[0] * factor, rows[1] - rows[0])
    out_cols = (cols[0] - origin[1] * factor, cols[1] - cols[0])

    def filtered(data: np.ndarray) -> np.ndarray:
        data = _upsample_axis(data, factor, kernel, *out_rows, axis=0)
        return _upsample_axis(data, factor, kernel, *out_cols, axis=1)

    result = filtered(values)
    if all_valid:
        # A full-valid weight array is the outer product of two ones vectors, and so is
        # its filtered version: 1-D weights, and as the taps sum to 1 only the rows and
        # columns within a kernel's reach of the source's edges differ from 1.
        for axis, (start, size) in enumerate((out_rows, out_cols)):
            along = _upsample_axis(np.ones(valid.shape[axis], np.float32), factor, kernel,
                                   start, size, 0)  # fmt: skip
            under = (start + np.arange(size)) // factor
            inside = (under >= 0) & (under < valid.shape[axis])
            blank = (along < MIN_WEIGHT) | ~inside
            edge = np.flatnonzero((np.abs(along - 1.0) > 1e-6) & ~blank)
            lines = np.moveaxis(result, axis, 0)  # a view: rows, or columns, first
            lines[edge] /= along[edge][:, None]
            lines[blank] = np.nan
        return result
    total = filtered(valid.astype(np.float32))
    low = total < MIN_WEIGHT
    total[low] = 1.0
    result /= total
    result[low] = np.nan
    centre = _centre_valid(valid, factor, out_rows[0], out_cols[0], result.shape)
    result[~centre] = np.nan
    return result


def _centre_valid(
    valid: np.ndarray, factor: int, row0: int, col0: int, shape: tuple[int, ...]
) -> np.ndarray:
    rows = (row0 + np.arange(shape[0])) // factor
    cols = (col0 + np.arange(shape[1])) // factor
    inside_r = (rows >= 0) & (rows < valid.shape[0])
    inside_c = (cols >= 0) & (cols < valid.shape[1])
    picked = valid[np.clip(rows, 0, valid.shape[0] - 1)][:, np.clip(cols, 0, valid.shape[1] - 1)]
    centre: np.ndarray = picked & inside_r[:, None] & inside_c[None, :]
    return centre


def downsample(
    source: np.ndarray,
    factor: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Mean of the valid fine pixels under each coarse pixel of a window.

    ``source`` holds fine pixels from ``origin`` (row, col) on, NaN where there is no
    data; ``rows`` and ``cols`` are the half-open window on the coarse grid, whose pixel
    ``(r, c)`` covers fine pixels ``factor * r`` to ``factor * (r + 1) - 1``. A coarse
    pixel with no valid fine pixel, or outside ``source``, is NaN.
    """
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, not {factor}")
    h, w = rows[1] - rows[0], cols[1] - cols[0]
    out = np.full((h, w), np.nan, dtype=np.float32)
    # A few coarse rows at a time: the fine block and its masks stay small.
    step = max(1, (1 << 22) // max(1, w * factor * factor))
    for top in range(0, h, step):
        part = (rows[0] + top, rows[0] + min(h, top + step))
        out[top : top + step] = _mean_cells(source, factor, part, cols, origin)
    return out


def _mean_cells(
    source: np.ndarray,
    factor: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    origin: tuple[int, int],
) -> np.ndarray:
    h, w = rows[1] - rows[0], cols[1] - cols[0]
    block = np.full((h * factor, w * factor), np.nan, dtype=np.float32)
    r0, c0 = rows[0] * factor - origin[0], cols[0] * factor - origin[1]
    src = source[max(r0, 0) : r0 + h * factor, max(c0, 0) : c0 + w * factor]
    dr, dc = max(-r0, 0), max(-c0, 0)
    block[dr : dr + src.shape[0], dc : dc + src.shape[1]] = src
    cells = block.reshape(h, factor, w, factor)
    valid = ~np.isnan(cells)
    count = valid.sum(axis=(1, 3))
    total = np.where(valid, cells, 0.0).sum(axis=(1, 3), dtype=np.float64)
    out = np.full((h, w), np.nan, dtype=np.float32)
    np.divide(total, count, out=out, where=count > 0, casting="unsafe")
    return out
