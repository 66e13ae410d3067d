"""`kappamask fetch-weights` against a real HTTP server on localhost serving Keras weight
files the tests write (the Keras 2 ``save_weights`` layout, built with h5py), and the
provenance every model carries from then on."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from kappamask.bands import ARCHITECTURE_FEATURES, DEFAULT_FEATURES, MODEL_NAMES
from kappamask.cli import main
from kappamask.errors import InvalidInputError, StorageError
from kappamask.inference.model_spec import ORIGIN_OFFICIAL
from kappamask.inference.repository import DEFAULT_REPOSITORY, spec_from_onnx
from kappamask.model.architecture import conv_specs
from kappamask.tools.official import OFFICIAL_RELEASE, download, official_file

from .conftest import T29UNU, write_keras_deeplab

#: The U-Net files, as --architecture unet asks for them.
OFFICIAL_FILES = {level: official_file(level, "unet") for level in MODEL_NAMES}

FILTERS = 4  # the published files have 64; a small U-Net keeps the test fast


def write_keras_unet(path: Path, channels: int, outputs: int = 6, seed: int = 0) -> Path:
    """A Keras 2 ``save_weights`` file of the KappaMask U-Net (layer order of the model,
    pooling and dropout layers without weights in between, as Keras writes them)."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        for i, spec in enumerate(conv_specs(channels, FILTERS, outputs)):
            name = f"conv2d_{i}" if i else "conv2d"
            group = f.create_group(name)
            kernel = rng.normal(
                0, 0.1, (spec.kernel, spec.kernel, spec.in_channels, spec.out_channels)
            ).astype(np.float32)
            group.create_dataset(f"{name}/kernel:0", data=kernel)
            group.create_dataset(f"{name}/bias:0", data=np.zeros(spec.out_channels, np.float32))
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            names.append(name)
            if i in (1, 3):
                pool = f"max_pooling2d_{i}"
                f.create_group(pool).attrs["weight_names"] = []
                names.append(pool)
        f.attrs["layer_names"] = [n.encode() for n in names]
    return path


class _Handler(SimpleHTTPRequestHandler):
    """Static files; ``/broken/NAME`` sends half of NAME then closes the connection the
    first time, and honours Range requests (so a download can resume)."""

    broken_once: ClassVar[set[str]] = set()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.startswith("/broken/"):
            return super().do_GET()
        data = (Path(self.directory) / self.path.removeprefix("/broken/")).read_bytes()
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path not in self.broken_once:
            self.broken_once.add(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return None
        self.wfile.write(body)
        return None


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on localhost serving a folder: (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()

    def handler(*args: Any, **kwargs: Any) -> _Handler:
        return _Handler(*args, directory=str(folder), **kwargs)

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A copy of the project's model repository (bootstrap weights)."""
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_REPOSITORY, repo, symlinks=True)
    return repo


def _snapshot(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _fetch(*args: str, architecture: str = "unet") -> Any:
    return CliRunner().invoke(main, ["fetch-weights", "--architecture", architecture, *args])


def test_fetch_installs_both_levels_and_names_them(
    http_folder: tuple[str, Path], repository: Path
) -> None:
    url, folder = http_folder
    digests = {}
    for level, name in OFFICIAL_FILES.items():
        path = write_keras_unet(folder / name, len(DEFAULT_FEATURES[level]))
        digests[level] = hashlib.sha256(path.read_bytes()).hexdigest()
    done = _fetch("--base-url", url, "--repository", str(repository))
    assert done.exit_code == 0, done.output
    for level, digest in digests.items():
        assert f"sha256 {digest}" in done.output
        model_dir = repository / MODEL_NAMES[level]
        spec = spec_from_onnx(model_dir / "1" / "model.onnx")
        assert spec.origin == ORIGIN_OFFICIAL
        assert spec.version_label == f"{OFFICIAL_RELEASE}-{digest[:12]}"
        config = (model_dir / "config.pbtxt").read_text()
        onnx_digest = hashlib.sha256((model_dir / "1" / "model.onnx").read_bytes()).hexdigest()
        assert f'key: "origin" value: {{ string_value: "{ORIGIN_OFFICIAL}" }}' in config
        assert f'key: "onnx_sha256" value: {{ string_value: "{onnx_digest}" }}' in config
        # the bootstrap INT8 file is neither kept nor named
        assert 'key: "int8_file" value: { string_value: "" }' in config
        assert not (model_dir / "1" / "model.int8.onnx").exists()
    assert not list(repository.glob(".kappamask-fetch-*"))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            "missing",
            "not found (HTTP 404); km_predict names its DeepLabv3+ weights "
            "l1c_deeplabv3plus.hdf5: try --architecture deeplabv3plus",
        ),
        ("truncated", "is not an HDF5 file"),
        ("damaged", "truncated file"),
        ("html", "is not an HDF5 file"),
        ("channels", "not the 13 features of the L1C model"),
        ("outputs", "has 3 outputs"),
        ("architecture", "holds a DeepLabv3+, not a U-Net"),
    ],
)
def test_bad_downloads_install_nothing(
    http_folder: tuple[str, Path], repository: Path, setup: str, message: str
) -> None:
    url, folder = http_folder
    target = folder / OFFICIAL_FILES["L1C"]
    if setup == "truncated":
        data = write_keras_unet(target, 13).read_bytes()
        target.write_bytes(data[: len(data) // 3])
    elif setup == "damaged":  # the header survives, the last layers' data do not
        data = write_keras_unet(target, 13).read_bytes()
        target.write_bytes(data[: len(data) * 9 // 10])
    elif setup == "html":
        target.write_text("<html><body>Access Denied</body></html>")
    elif setup == "channels":
        write_keras_unet(target, 10)
    elif setup == "outputs":
        write_keras_unet(target, 13, outputs=3)
    elif setup == "architecture":
        write_keras_deeplab(target, 13)
    before = _snapshot(repository)
    done = _fetch("--level", "L1C", "--base-url", url, "--repository", str(repository))
    failure = StorageError if setup == "missing" else InvalidInputError  # not there / not it
    assert done.exit_code == failure.exit_code
    assert message in done.output and "Traceback" not in done.output
    assert _snapshot(repository) == before
    assert not list(repository.glob(".kappamask-fetch-*"))


def test_one_bad_level_installs_neither(http_folder: tuple[str, Path], repository: Path) -> None:
    url, folder = http_folder
    write_keras_unet(folder / OFFICIAL_FILES["L1C"], 13)  # good; L2A missing
    before = _snapshot(repository)
    done = _fetch("--base-url", url, "--repository", str(repository))
    assert done.exit_code == StorageError.exit_code and "l2a_unet.hdf5: not found" in done.output
    assert _snapshot(repository) == before


def test_a_repository_that_cannot_be_written(http_folder: tuple[str, Path], tmp_path: Path) -> None:
    url, folder = http_folder
    write_keras_unet(folder / OFFICIAL_FILES["L1C"], 13)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _fetch("--level", "L1C", "--base-url", url, "--repository", str(blocker / "repo"))
    assert done.exit_code == InvalidInputError.exit_code
    assert "cannot write the model repository" in done.output


def test_a_broken_transfer_resumes(http_folder: tuple[str, Path], tmp_path: Path) -> None:
    url, folder = http_folder
    source = write_keras_unet(folder / "w.hdf5", 13)
    waits: list[float] = []
    out = download(f"{url}/broken/w.hdf5", tmp_path / "w.hdf5", sleep=waits.append)
    assert out.read_bytes() == source.read_bytes()
    assert len(waits) == 1  # one retry, which asked for the missing bytes only


def test_a_server_that_keeps_failing(tmp_path: Path) -> None:
    waits: list[float] = []
    with pytest.raises(StorageError, match="download failed after 3 attempts"):
        download("http://127.0.0.1:9/none.hdf5", tmp_path / "x", attempts=3, sleep=waits.append)
    assert waits == [2.0, 4.0]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_default_is_km_predict_s_deeplab_served_end_to_end(
    http_folder: tuple[str, Path], repository: Path, tmp_path: Path
) -> None:
    """`fetch-weights` with no flags asks for the files km_predict downloads
    (``<level>_deeplabv3plus.hdf5``), installs both levels with provenance
    official/deeplabv3plus, and the served L2A model masks a real product with its 14
    features (B07 included) read from the product."""
    from kappamask.inference.server import LocalTriton
    from kappamask.inference.triton import TritonClient
    from kappamask.options import RunOptions
    from kappamask.pipeline import run

    url, folder = http_folder
    digests = {}
    for level in MODEL_NAMES:
        path = write_keras_deeplab(
            folder / f"{level.lower()}_deeplabv3plus.hdf5",
            len(ARCHITECTURE_FEATURES["deeplabv3plus"][level]),
        )
        digests[level] = hashlib.sha256(path.read_bytes()).hexdigest()
    done = CliRunner().invoke(
        main, ["fetch-weights", "--base-url", url, "--repository", str(repository)]
    )
    assert done.exit_code == 0, done.output
    for level, digest in digests.items():
        assert f"{level.lower()}_deeplabv3plus.hdf5" in done.output and digest in done.output
        config = (repository / MODEL_NAMES[level] / "config.pbtxt").read_text()
        for key, value in (
            ("origin", ORIGIN_OFFICIAL),
            ("architecture", "deeplabv3plus"),
            ("weights_sha256", digest),
        ):
            assert f'key: "{key}" value: {{ string_value: "{value}" }}' in config
    config = (repository / MODEL_NAMES["L2A"] / "config.pbtxt").read_text()
    assert ",".join(ARCHITECTURE_FEATURES["deeplabv3plus"]["L2A"]) in config
    with LocalTriton(repository) as triton, TritonClient(triton.http_url) as client:
        result = run(T29UNU, tmp_path / "out", client, RunOptions(resolution=60))
    provenance = result.model_provenance
    assert (provenance["origin"], provenance["architecture"]) == (ORIGIN_OFFICIAL, "deeplabv3plus")
    assert provenance["weights_sha256"] == digests["L2A"]
    item = json.loads((tmp_path / "out" / Path(result.item).name).read_text())
    assert "KappaMask DeepLabv3+ (km_predict's)" in item["properties"]["processing:lineage"]
    # B07 read from the product; only B08, which an L2A product has at 10 m only, stood in
    assert item["properties"]["kappamask:substituted_bands"] == {"B08": "B8A"}
    assert result.crops_inferred > 0
