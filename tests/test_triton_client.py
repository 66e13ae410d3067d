"""How crops reach a real Triton: through shared memory where it shares this host's, in
the request body where it does not, the same answers either way."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm

from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import CropOutputs, TritonClient


def _crops(channels: int, count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    # a view into a wider strip, as the pipeline hands them over (not contiguous)
    strip = rng.uniform(0.0, 0.6, (channels, 512, 512 * count + 32)).astype(np.float16)
    return [strip[:, :, 512 * i + 16 : 512 * (i + 1) + 16] for i in range(count)]


def _answers(client: TritonClient, crops: list[np.ndarray]) -> list[CropOutputs]:
    spec = client.model("L1C")
    return [f.result() for f in [client.submit(spec.name, c) for c in crops]]


def _server(triton: LocalTriton) -> Any:
    return triton_http.InferenceServerClient(triton.http_url.split("//")[-1])


def _regions(triton: LocalTriton) -> list[str]:
    server = _server(triton)
    try:
        return [r["name"] for r in server.get_system_shared_memory_status()]
    finally:
        server.close()


def _same(a: list[CropOutputs], b: list[CropOutputs]) -> bool:
    return all(
        np.array_equal(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)
    )


@pytest.fixture
def reference(triton: LocalTriton) -> list[CropOutputs]:
    with TritonClient(triton.http_url, shared_memory=False) as client:
        return _answers(client, _crops(13))


def test_crops_go_through_shared_memory_and_nothing_is_left(
    triton: LocalTriton, reference: list[CropOutputs]
) -> None:
    before = set(os.listdir("/dev/shm"))
    with TritonClient(triton.http_url, in_flight=2) as client:
        answers = _answers(client, _crops(13))
        assert client.shared_memory
        assert [r for r in _regions(triton) if r.startswith(f"kappamask-{os.getpid()}-")]
    assert _same(answers, reference)
    assert not [r for r in _regions(triton) if r.startswith(f"kappamask-{os.getpid()}-")]
    assert set(os.listdir("/dev/shm")) <= before


def test_a_triton_that_cannot_open_the_region_gets_the_crops_in_the_body(
    triton: LocalTriton, reference: list[CropOutputs], monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a Triton on another host sees: a key it cannot open (here the region exists
    # under another key)
    create = shm.create_shared_memory_region
    monkeypatch.setattr(
        shm,
        "create_shared_memory_region",
        lambda name, key, size: create(name, f"{key}-elsewhere", size),
    )
    with TritonClient(triton.http_url) as client:
        answers = _answers(client, _crops(13))
        assert not client.shared_memory  # refused once, then the body
    assert _same(answers, reference)


def test_a_region_triton_forgot_is_registered_again(
    triton: LocalTriton, reference: list[CropOutputs]
) -> None:
    with TritonClient(triton.http_url, in_flight=1) as client:
        first = _answers(client, _crops(13)[:1])
        # what a restarted Triton knows of this client's region: nothing
        server = _server(triton)
        server.unregister_system_shared_memory()
        server.close()
        again = _answers(client, _crops(13))
        assert client.shared_memory
    assert _same(first, reference[:1]) and _same(again, reference)
