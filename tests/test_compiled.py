"""Compiled kernels run whether or not numba can cache them on disk."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from numba.core import caching

from kappamask.reading.compiled import kernel


def _twice(values: np.ndarray, out: np.ndarray) -> None:
    for i in range(values.size):
        out[i] = 2 * values[i]


def test_a_kernel_without_a_writable_cache_compiles_in_the_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # no place numba may write its cache to: what a read-only image without
    # NUMBA_CACHE_DIR gives
    impl = caching.CacheImpl
    monkeypatch.setattr(impl, "_locator_classes", [])
    with caplog.at_level(logging.INFO, logger="kappamask.reading.compiled"):
        twice = kernel(_twice)
    assert "compiled by each process" in caplog.text
    out = np.empty(3)
    twice(np.arange(3.0), out)
    assert out.tolist() == [0.0, 2.0, 4.0]
