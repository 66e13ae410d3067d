"""KappaZeta's published KappaMask weights: download, check, convert, install
(``kappamask fetch-weights``).

km_predict (v2.0 to v2.4) downloads ``<level>_<architecture>.hdf5`` (Keras 2
``save_weights``) from KappaZeta's 2022-09-13 release folder, with DeepLabv3+ as its
default architecture for both levels: ``l1c_deeplabv3plus.hdf5`` and
``l2a_deeplabv3plus.hdf5``. Those are fetched by default; ``--architecture unet`` asks for
``l1c_unet.hdf5`` / ``l2a_unet.hdf5``, the paper's architecture, which km_predict v2 never
requests (nothing shows the folder holds them). Each file is downloaded next to the
repository (resumed with an HTTP Range request after a broken transfer, retried with
back-off), then checked to be that architecture of its level (HDF5, Keras layout, every
layer of the network with the level's input channels and 6 outputs) and converted to the
served ONNX, all before anything in the repository changes. Only then are the models
installed, so a failed download, a file of another kind or a repository that cannot be
written leave the models that were served before as they were.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from tqdm import tqdm

from kappamask.bands import ARCHITECTURE_FEATURES, LEVELS, MODEL_NAMES
from kappamask.errors import InvalidInputError, KappaMaskError, StorageError
from kappamask.inference.model_spec import (
    ARCHITECTURE_DEEPLAB,
    ARCHITECTURE_UNET,
    OFFSET_TRAINING,
    ORIGIN_OFFICIAL,
)
from kappamask.inference.repository import install_model, sha256_of
from kappamask.tools.keras_import import (
    architecture_of,
    deeplab_layers,
    import_keras,
    keras_to_weights,
    read_keras_convs,
    read_keras_layers,
)

LOGGER = logging.getLogger(__name__)

#: Where km_predict downloads the weights from (KappaZeta's public bucket website).
OFFICIAL_BASE_URL = (
    "http://kappamask.s3-website.eu-central-1.amazonaws.com/model_weights/2022-09-13/"
)
#: Version label prefix of the installed models (the release folder of the weights).
OFFICIAL_RELEASE = "kappazeta-2022-09-13"
#: km_predict's default architecture, and the one fetched unless told otherwise.
DEFAULT_ARCHITECTURE = ARCHITECTURE_DEEPLAB
_NETWORKS = {ARCHITECTURE_DEEPLAB: "DeepLabv3+", ARCHITECTURE_UNET: "U-Net"}


def official_file(level: str, architecture: str = DEFAULT_ARCHITECTURE) -> str:
    """km_predict's name of a weights file: ``<level>_<architecture>.hdf5``."""
    return f"{level.lower()}_{architecture}.hdf5"


class NotPublishedError(StorageError):
    """The server has no such file (HTTP 404)."""


ATTEMPTS = 4
CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchedModel:
    """One downloaded, checked and converted model, ready to install."""

    level: str
    url: str
    weights: Path
    sha256: str
    onnx: Path
    version: str
    architecture: str
    #: What the check found (a U-Net's base filters, km_predict's DeepLabv3+).
    detail: str


def download(
    url: str,
    dest: Path,
    attempts: int = ATTEMPTS,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar.

    A transfer that breaks is resumed from the bytes already received (HTTP Range; from
    the start where the server ignores ranges), up to ``attempts`` times with back-off.
    The file must end at the size the server announced; ``dest`` appears only then.
    """
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    last: str = ""
    for attempt in range(attempts):
        if attempt:
            sleep(min(2.0**attempt, 30.0))
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
                if response.status_code == 404:
                    raise NotPublishedError(f"{url}: not found (HTTP 404)")
                if response.status_code >= 400:
                    last = f"HTTP {response.status_code}"
                    if response.status_code < 500:
                        raise StorageError(f"{url}: the server answered {last}")
                    continue
                resumed = response.status_code == 206
                if not resumed:
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with (
                    part.open("ab" if resumed else "wb") as fh,
                    tqdm(
                        total=total,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        desc=dest.name,
                        leave=False,
                    ) as bar,
                ):
                    for chunk in response.iter_content(CHUNK):
                        fh.write(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size < total:
                last = f"the transfer broke after {size} of {total} bytes"
                continue
            part.replace(dest)
            return dest
        except requests.RequestException as err:
            last = str(err) or type(err).__name__
    part.unlink(missing_ok=True)
    raise StorageError(f"{url}: download failed after {attempts} attempts ({last})")


def check_weights(path: Path, level: str, architecture: str = DEFAULT_ARCHITECTURE) -> str:
    """That ``path`` is the KappaMask ``architecture`` of ``level``; what was found."""
    network = _NETWORKS[architecture]
    try:
        layers = read_keras_layers(path)
        found = architecture_of(layers)
        if found != architecture:
            raise InvalidInputError(f"{path.name} holds a {_NETWORKS[found]}, not a {network}")
        if architecture == ARCHITECTURE_DEEPLAB:
            _layers, channels = deeplab_layers(layers, path.name)
            detail = "km_predict's DeepLabv3+"
        else:
            _weights, channels, filters = keras_to_weights(read_keras_convs(path))
            detail = f"{filters} base filters"
    except (OSError, KeyError, ValueError) as err:  # h5py on a damaged file past its header
        raise InvalidInputError(f"{path.name} cannot be read as Keras weights: {err}") from err
    expected = len(ARCHITECTURE_FEATURES[architecture][level])
    if channels != expected:
        raise InvalidInputError(
            f"{path.name} is a {network} of {channels} input channels, not the {expected} "
            f"features of the {level} model"
        )
    return detail


def _writable(repository: Path) -> None:
    try:
        repository.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidInputError(f"cannot write the model repository {repository}: {err}") from err
    if not os.access(repository, os.W_OK | os.X_OK):
        raise InvalidInputError(f"the model repository {repository} is not writable")
    if not all(os.access(p, os.W_OK) for p in repository.rglob("*") if p.is_file()):
        raise InvalidInputError(f"files in the model repository {repository} are not writable")
    for level in LEVELS:
        model_dir = repository / MODEL_NAMES[level]
        if model_dir.exists() and not os.access(model_dir, os.W_OK | os.X_OK):
            raise InvalidInputError(f"{model_dir} is not writable")


@dataclass(frozen=True)
class Release:
    """Which published files to fetch (a folder, an architecture) and the offset rule the
    installed models declare (model_spec.OFFSET_RULES)."""

    base_url: str = OFFICIAL_BASE_URL
    architecture: str = DEFAULT_ARCHITECTURE
    offset_rule: str = OFFSET_TRAINING


def fetch(levels: Sequence[str], release: Release, work_dir: Path) -> list[FetchedModel]:
    """Download, check and convert the weights of ``levels`` of ``release`` into
    ``work_dir``."""
    fetched = []
    base_url, architecture = release.base_url, release.architecture
    network = _NETWORKS[architecture]
    for level in levels:
        name = official_file(level, architecture)
        url = base_url.rstrip("/") + "/" + name
        try:
            weights = download(url, work_dir / name)
        except NotPublishedError as err:
            other = next(a for a in _NETWORKS if a != architecture)
            raise NotPublishedError(
                f"{err}; km_predict names its {_NETWORKS[other]} weights "
                f"{official_file(level, other)}: try --architecture {other}"
            ) from err
        digest = sha256_of(weights)
        try:
            detail = check_weights(weights, level, architecture)
        except InvalidInputError as err:
            raise InvalidInputError(f"{url} is not the KappaMask {level} {network}: {err}") from err
        version = f"{OFFICIAL_RELEASE}-{digest[:12]}"
        onnx_path = work_dir / f"{level.lower()}_{architecture}.onnx"
        import_keras(
            weights,
            level,
            onnx_path,
            version=version,
            origin=ORIGIN_OFFICIAL,
            offset_rule=release.offset_rule,
        )
        fetched.append(
            FetchedModel(level, url, weights, digest, onnx_path, version, architecture, detail)
        )
        LOGGER.info("%s: sha256 %s, %s", url, digest, detail)
    return fetched


def fetch_and_install(
    levels: Sequence[str], release: Release, repository: Path
) -> list[tuple[FetchedModel, Path]]:
    """``fetch`` every level, then install them all as the default models of their level.

    Nothing in ``repository`` changes unless every level downloaded, checked and
    converted, and the repository is writable.
    """
    _writable(repository)
    with tempfile.TemporaryDirectory(prefix=".kappamask-fetch-", dir=repository) as tmp:
        fetched = fetch(levels, release, Path(tmp))
        installed = []
        for model in fetched:
            try:
                installed.append((model, install_model(model.onnx, repository, model.level)))
            except OSError as err:
                raise KappaMaskError(f"installing {model.level} into {repository}: {err}") from err
    return installed
