"""Per-pixel kernels compiled by numba: one pass over a pixel's arithmetic where numpy
would make one pass per operation (and numpy 1.x casts to float16 one element at a
time).

A kernel compiles on its first call in a process (about a second) and is cached on disk
where numba finds a writable place: the package's ``__pycache__``, ``NUMBA_CACHE_DIR``
(the images set it) or the user's cache folder. Where none is writable the kernels still
run, compiled again by each process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

from numba import njit

LOGGER = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def kernel(fn: F) -> F:
    """``fn`` compiled (released GIL, cached on disk where possible)."""
    try:
        compiled: Any = njit(nogil=True, cache=True)(fn)
    except RuntimeError as err:  # numba: "cannot cache function ...: no locator available"
        LOGGER.info("%s is compiled by each process: %s", fn.__qualname__, err)
        compiled = njit(nogil=True)(fn)
    return cast(F, compiled)


def inline_kernel(fn: F) -> F:
    """A helper of kernels, compiled into each of them."""
    return cast(F, njit(inline="always")(fn))
