"""Opening SAFE products: folders, zips, every band naming scheme, broken products."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from kappamask.access import AccessPolicy
from kappamask.errors import AccessDeniedError, ProductError, ProductNotFoundError
from kappamask.sources import open_product, open_safe
from kappamask.sources.safe import find_band_files

from .conftest import T22HBD, T29UNU


def _zip(folder: Path, dst: Path) -> Path:
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return dst


def test_open_folder_reads_level_offsets_and_60m_bands() -> None:
    product = open_safe(T29UNU)
    assert product.product_id == "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454"
    assert product.level == "L2A" and product.mgrs_tile == "29UNU" and product.crs == "EPSG:32629"
    assert product.offsets["B04"] == -1000.0
    assert not product.has_band("B08")  # Sen2Cor writes no B08 at 60 m
    assert product.band_path("B02", 10)[1] == 60


def test_finest_file_for_10m_and_coarsest_sufficient_file_for_60m() -> None:
    product = open_safe(T22HBD)
    assert product.band_path("B02", 10)[1] == 10
    assert product.band_path("B02", 20)[1] == 20
    assert product.band_path("B02", 60)[1] == 60
    assert product.band_path("B05", 10)[1] == 20  # no 10 m B05: finest there is
    assert product.offsets == {}  # baseline 02.14


def test_zip_gives_the_same_product_through_vsizip(tmp_path: Path) -> None:
    product = open_safe(_zip(T29UNU, tmp_path / "product.zip"))
    assert product.level == "L2A"
    assert product.band_path("B02", 60)[0].startswith("/vsizip/")


def test_truncated_zip_is_a_clear_error(tmp_path: Path) -> None:
    whole = _zip(T22HBD, tmp_path / "whole.zip").read_bytes()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ProductError, match="zip"):
        open_safe(broken)


def test_band_names_of_every_scheme() -> None:
    names = [
        # pre-2017 long names
        "GRANULE/S2A_OPER_MSI_L1C_TL_SGS__20151221T001/IMG_DATA/S2A_OPER_MSI_L1C_TL_SGS__20151221T001_A002_T31TCJ_B8A.jp2",
        # compact L1C
        "GRANULE/L1C_T32TQM_A1/IMG_DATA/T32TQM_20170101T101421_B01.jp2",
        "GRANULE/L1C_T32TQM_A1/IMG_DATA/T32TQM_20170101T101421_TCI.jp2",
        # L2A with resolution folders, GeoTIFF variant
        "GRANULE/L2A_T11SLT_A1/IMG_DATA/R20m/T11SLT_20150826T185436_B02_20m.tif",
        "GRANULE/L2A_T11SLT_A1/IMG_DATA/R10m/T11SLT_20150826T185436_B02_10m.tif",
        "GRANULE/L2A_T11SLT_A1/QI_DATA/MSK_CLDPRB_20m.jp2",
    ]
    found = find_band_files(names)
    assert set(found) == {"B8A", "B01", "B02"}
    assert set(found["B02"]) == {10, 20}
    assert set(found["B01"]) == {60} and set(found["B8A"]) == {20}


def test_missing_metadata_is_not_a_product(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_product.SAFE"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(ProductError, match="not a Sentinel-2 L1C/L2A SAFE product"):
        open_safe(folder)


def test_missing_path_and_roots() -> None:
    with pytest.raises(ProductNotFoundError):
        open_product(str(T29UNU) + "_nope")
    with pytest.raises(AccessDeniedError):
        open_product(str(T29UNU), AccessPolicy(data_roots=(T22HBD,)))
    with pytest.raises(AccessDeniedError):
        open_product(str(T22HBD / ".." / T29UNU.name), AccessPolicy(data_roots=(T22HBD,)))
    assert open_product(str(T29UNU), AccessPolicy(data_roots=(T29UNU.parent,))).level == "L2A"


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape.SAFE").symlink_to(T29UNU)
    with pytest.raises(AccessDeniedError):
        open_product(str(root / "escape.SAFE"), AccessPolicy(data_roots=(root,)))


def test_multi_tile_products_are_refused(product_copy: Path) -> None:
    granules = product_copy / "GRANULE"
    first = next(granules.iterdir())
    shutil.copytree(first, granules / (first.name + "_2"))
    with pytest.raises(ProductError, match="2 tiles"):
        open_safe(product_copy)


def test_l1c_compact_layout(l1c_safe: Path) -> None:
    product = open_safe(l1c_safe)
    assert product.level == "L1C" and product.processing_baseline == "02.09"
    assert product.mgrs_tile == "01LAC" and product.offsets == {}
    assert len(product.band_files) == 13 and product.band_path("B10", 10)[1] == 60
    assert product.band_path("B02", 60)[1] == 10


def test_band_file_linked_outside_the_roots_is_refused(tmp_path: Path) -> None:
    """The SAFE folder is inside the root, but one band file links to outside it."""
    root = tmp_path / "root"
    safe = root / T29UNU.name
    shutil.copytree(T29UNU, safe)
    band = next(safe.glob("GRANULE/*/IMG_DATA/R60m/*_B02_60m.jp2"))
    outside = tmp_path / "outside.jp2"
    band.rename(outside)
    band.symlink_to(outside)
    with pytest.raises(AccessDeniedError, match="outside the data roots"):
        open_product(str(safe), AccessPolicy(data_roots=(root,)))
    assert open_product(str(safe), AccessPolicy(data_roots=(root, tmp_path))).level == "L2A"
