"""Label Studio's brush masks: run-length packed RGBA bytes (the ``rle`` of a
``brushlabels`` result).

The format (thi.ng's rle-pack, as Label Studio's editor writes and reads it) is a bit
stream, most significant bit first:

- a header: the number of values (32 bits), the word size minus one (5 bits) and four
  run-length field sizes minus one (4 bits each);
- then chunks: one flag bit (1: a run of one repeated word, 0: literal words), two bits
  choosing one of the four field sizes, the chunk's length minus one in that many bits,
  and then one word (a run) or that many words (literals).

The values are the mask's RGBA bytes, row by row; the editor draws with the alpha
channel, so a pixel belongs to the stroke where its alpha is at least half.
"""

from __future__ import annotations

import numpy as np

from kappamask.errors import InvalidInputError

#: Run-length field sizes written here (bits): short runs cost 3 bits, a run up to a whole
#: 512 x 512 RGBA sub-tile's 2^16 bytes costs 16.
RUN_BITS = (3, 4, 8, 16)
WORD_BITS = 8
CHANNELS = 4  # RGBA


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The ``widths[i]`` low bits of every ``values[i]``, most significant first, one
    after the other (uint8 0/1)."""
    top = int(widths.max()) if widths.size else 0
    shifts = np.arange(top - 1, -1, -1, dtype=np.int64)
    matrix = (values[:, None].astype(np.int64) >> shifts[None, :]) & 1
    # left-aligned fields: drop the leading columns a narrower field does not have
    keep = shifts[None, :] < widths[:, None]
    bits: np.ndarray = matrix[keep].astype(np.uint8)
    return bits


def encode(mask: np.ndarray) -> list[int]:
    """A boolean [h, w] mask as a brush ``rle`` (a list of bytes): 255 in every channel
    where ``mask`` is set, as Label Studio's own converters write it."""
    values = np.repeat(np.where(mask.ravel(), 255, 0).astype(np.int64), CHANNELS)
    total = values.size
    change = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [total]]))
    words = values[starts]
    # runs longer than the widest field go out as several chunks
    limit = 1 << RUN_BITS[-1]
    pieces = -(-lengths // limit)
    words = np.repeat(words, pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    index = np.arange(pieces.sum()) - first
    lengths = np.minimum(np.repeat(lengths, pieces) - index * limit, limit)
    size = np.searchsorted(np.array([1 << b for b in RUN_BITS]), lengths)
    run_bits = np.array(RUN_BITS)[size]
    # per chunk: flag 1, size choice, length - 1, the word
    fields = np.stack([np.ones_like(lengths), size, lengths - 1, words], axis=1).ravel()
    widths = np.stack(
        [
            np.ones_like(lengths),
            np.full_like(lengths, 2),
            run_bits,
            np.full_like(lengths, WORD_BITS),
        ],
        axis=1,
    ).ravel()
    header = np.array([total, WORD_BITS - 1, *(b - 1 for b in RUN_BITS)], np.int64)
    header_widths = np.array([32, 5, 4, 4, 4, 4], np.int64)
    stream = np.concatenate([_bits(header, header_widths), _bits(fields, widths)])
    return [int(b) for b in np.packbits(stream)]


class _BitReader:
    """Fields of a bit stream, in order. A string of "0"/"1" read with int(.., 2): a
    sub-tile's stream has some 10^5 fields, which numpy per field would take seconds for."""

    def __init__(self, data: bytes) -> None:
        self.bits = "".join(f"{b:08b}" for b in data)
        self.at = 0

    def read(self, count: int) -> int:
        if self.at + count > len(self.bits):
            raise InvalidInputError("a brush rle ends in the middle of a value")
        value = int(self.bits[self.at : self.at + count], 2)
        self.at += count
        return value


def decode(rle: list[int], width: int, height: int) -> np.ndarray:
    """A brush ``rle`` as a boolean [height, width] mask (alpha at least 128)."""
    try:
        reader = _BitReader(bytes(rle))
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"a brush rle is not a list of bytes: {err}") from err
    total = reader.read(32)
    if total != width * height * CHANNELS:
        raise InvalidInputError(
            f"a brush rle holds {total} values, not {width} x {height} RGBA pixels"
        )
    word = reader.read(5) + 1
    run_bits = [reader.read(4) + 1 for _ in range(4)]
    out = np.zeros(total, np.uint32)
    i = 0
    while i < total:
        repeated = reader.read(1)
        end = min(total, i + 1 + reader.read(run_bits[reader.read(2)]))
        if repeated:
            out[i:end] = reader.read(word)
        else:
            for k in range(i, end):
                out[k] = reader.read(word)
        i = end
    alpha = out.reshape(height, width, CHANNELS)[:, :, 3]
    # a wider word than a byte (the format allows it) still means 0..255 here
    mask: np.ndarray = alpha >= (128 if word <= 8 else (1 << (word - 1)))
    return mask
