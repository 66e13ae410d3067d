"""Open a Sentinel-2 SAFE product, as a folder or as a zip, into a Product.

Band files are found by name under GRANULE/*/IMG_DATA, which covers every naming
scheme since 2015: the pre-2017 long names (``S2A_OPER_MSI_L1C_TL_..._B01.jp2``), the
compact L1C names (``T32TQM_20170101T101421_B01.jp2``) and the L2A R10m/R20m/R60m
folders (``..._B01_60m.jp2``), in JPEG 2000 or GeoTIFF.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import IO

from kappamask.access import AccessPolicy
from kappamask.bands import AUX_BANDS, NATIVE_RESOLUTION, SPECTRAL_BANDS
from kappamask.errors import ProductError, ProductNotFoundError
from kappamask.sources.metadata import parse_product_metadata, parse_tile_metadata
from kappamask.sources.product import Product
from kappamask.storage.s3 import S3Settings

LOGGER = logging.getLogger(__name__)

_BAND_FILE = re.compile(
    r"(?:^|_)(B0[1-9]|B1[0-2]|B8A|AOT|WVP|SCL)(?:_(10|20|60)m)?\.(jp2|tif|tiff)$", re.IGNORECASE
)
_PRODUCT_MTD = re.compile(
    r"(^|/)(MTD_MSIL1C|MTD_MSIL2A|[^/]*MTD_SAFL1C[^/]*|[^/]*MTD_SAFL2A[^/]*)\.xml$"
)
_TILE_MTD = re.compile(r"^GRANULE/[^/]+/(MTD_TL|[^/]*MTD_L1C_TL[^/]*|[^/]*MTD_L2A_TL[^/]*)\.xml$")


#: Largest metadata file read (MTD_TL.xml with its angle grids is about 1 MB): a sparse
#: 10 GB "MTD_MSIL2A.xml" or a zip member that inflates without end is refused, not
#: held in memory.
MAX_METADATA_BYTES = 32 * 2**20


def capped(data: bytes, name: str) -> bytes:
    """``data`` read with one byte more than ``MAX_METADATA_BYTES`` allows, refused when
    that byte came."""
    if len(data) > MAX_METADATA_BYTES:
        raise ProductError(
            f"{PurePosixPath(name).name} is larger than {MAX_METADATA_BYTES} "
            "bytes: not Sentinel-2 metadata"
        )
    return data


class SafeFiles:
    """Names (relative, '/'-separated) of a product's files, readable as bytes or by GDAL."""

    def __init__(self, names: Iterable[str], read: Callable[[str], bytes], gdal_prefix: str):
        self.names = sorted(names)
        self.read = read
        self._gdal_prefix = gdal_prefix

    def gdal_path(self, name: str) -> str:
        return f"{self._gdal_prefix}/{name}"


def _list_folder(root: Path, policy: AccessPolicy) -> SafeFiles:
    names: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        names.extend(str(PurePosixPath(*rel.parts, f)) for f in files)

    def read(name: str) -> bytes:
        # the metadata as much as the bands: a file linked to outside the data roots, or
        # a FIFO in place of MTD_MSIL2A.xml, is refused before it is opened
        with policy.local_input(str(root / name)).open("rb") as file:
            return capped(file.read(MAX_METADATA_BYTES + 1), name)

    return SafeFiles(names, read, str(root))


#: What a corrupt or hostile zip raises: an encrypted member (RuntimeError), a compression
#: Python lacks (NotImplementedError), a stream that does not inflate (zlib.error).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    ValueError,
    zlib.error,
)


def list_zip(source: str | Path | IO[bytes], where: str, gdal_path: str) -> SafeFiles:
    """The members of a zipped SAFE product (a local file or a seekable remote object)."""
    try:
        archive = zipfile.ZipFile(source)
        names = [n for n in archive.namelist() if not n.endswith("/")]
    except _ZIP_ERRORS as err:
        raise ProductError(f"{where} is not a readable zip (truncated or corrupt: {err})") from err

    def read(name: str) -> bytes:
        try:
            with archive.open(name) as member:  # never inflated past the cap
                return capped(member.read(MAX_METADATA_BYTES + 1), name)
        except _ZIP_ERRORS as err:
            raise ProductError(f"cannot read {name} from the zip: {err}") from err

    return SafeFiles(names, read, f"/vsizip/{gdal_path}")


def _product_metadata_name(files: SafeFiles, where: str, max_depth: int) -> str:
    # At the top of the SAFE folder, or one level down in a zip of "X.SAFE/".
    found = [n for n in files.names if _PRODUCT_MTD.search(n) and n.count("/") <= max_depth]
    if not found:
        raise ProductError(
            f"{where} has no MTD_MSIL1C.xml or MTD_MSIL2A.xml at its top: "
            "not a Sentinel-2 L1C/L2A SAFE product"
        )
    return min(found, key=lambda n: (n.count("/"), len(n)))


def find_band_files(names: Iterable[str]) -> dict[str, dict[int, str]]:
    """Group the band files among ``names`` by layer and resolution."""
    found: dict[str, dict[int, str]] = {}
    for name in names:
        parts = name.split("/")
        if "IMG_DATA" not in parts:
            continue
        match = _BAND_FILE.search(parts[-1])
        if not match:
            continue
        band = match.group(1).upper()
        res = int(match.group(2)) if match.group(2) else NATIVE_RESOLUTION[band]
        found.setdefault(band, {})[res] = name
    return found


def open_safe(href: str | os.PathLike[str], policy: AccessPolicy | None = None) -> Product:
    """Resolve a local SAFE folder, a zip of one, or its MTD_MSIL*.xml into a Product;
    every file read and every band file lies where ``policy`` allows (default: anywhere,
    but never a FIFO, device or socket)."""
    policy = policy or AccessPolicy.unrestricted()
    path = Path(href)
    if not path.exists():
        raise ProductNotFoundError(f"product {path} does not exist")
    path = policy.local_input(str(path))
    if path.is_file() and path.suffix.lower() == ".xml":
        path = path.parent
    if path.is_dir():
        files = _list_folder(path, policy)
    elif zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
        files = list_zip(path, path.name, str(path))
    else:
        raise ProductError(f"{path.name} is neither a SAFE folder nor a zip of one")
    product = product_from_files(files, path.name, folder=path.is_dir(), href=str(href))
    for by_res in product.band_files.values():
        for band_file in by_res.values():
            if not band_file.startswith("/vsi"):
                policy.local_input(band_file)  # a band file linked to outside the roots
    return product


def product_from_files(
    files: SafeFiles,
    where: str,
    folder: bool,
    href: str,
    gdal_env: Mapping[str, str] | None = None,
    s3: S3Settings | None = None,
) -> Product:
    """Parse the metadata among ``files`` and find the band files: the Product."""
    mtd_name = _product_metadata_name(files, where, max_depth=0 if folder else 1)
    prefix = mtd_name[: mtd_name.rfind("/") + 1]
    files.names = [n for n in files.names if n.startswith(prefix)]
    meta = parse_product_metadata(files.read(mtd_name), PurePosixPath(mtd_name).name)
    tile_names = [n[len(prefix) :] for n in files.names if _TILE_MTD.search(n[len(prefix) :])]
    if len(tile_names) > 1 or meta.granule_count > 1:
        raise ProductError(
            f"{where} holds {max(len(tile_names), meta.granule_count)} tiles (a pre-2017 "
            "multi-tile product); submit the single-tile product of the tile you want"
        )
    if not tile_names:
        raise ProductError(
            f"{where} has no GRANULE/*/MTD_TL.xml: not a complete Sentinel-2 SAFE product"
        )
    tile = parse_tile_metadata(
        files.read(prefix + tile_names[0]), PurePosixPath(tile_names[0]).name
    )

    band_files = {
        band: {res: files.gdal_path(prefix + name) for res, name in by_res.items()}
        for band, by_res in find_band_files(n[len(prefix) :] for n in files.names).items()
    }
    spectral = [b for b in SPECTRAL_BANDS if b in band_files]
    LOGGER.info(
        "opened %s: %s baseline %s, %d spectral bands%s",
        meta.product_uri or where,
        meta.level,
        meta.processing_baseline,
        len(spectral),
        "".join(f", {a}" for a in AUX_BANDS if a in band_files),
    )
    product_id = (meta.product_uri or where).removesuffix(".SAFE").removesuffix(".zip")
    return Product(
        product_id=product_id,
        level=meta.level,
        processing_baseline=meta.processing_baseline,
        sensing_time=tile.sensing_time,
        spacecraft=meta.spacecraft,
        mgrs_tile=tile.mgrs_tile,
        crs=tile.crs,
        band_files=band_files,
        offsets=meta.offsets,
        quantification=meta.quantification,
        footprint=meta.footprint,
        sun_azimuth=tile.sun_azimuth,
        sun_zenith=tile.sun_zenith,
        href=href,
        gdal_env=dict(gdal_env or {}),
        s3=s3,
    )
