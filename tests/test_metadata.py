"""The product and tile metadata parsers on real files across processing baselines."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kappamask.bands import SPECTRAL_BANDS
from kappamask.errors import ProductError
from kappamask.sources.metadata import parse_product_metadata, parse_tile_metadata

from .conftest import METADATA, T22HBD, T29UNU


def _product(name: str) -> bytes:
    folder = METADATA / name
    return next(folder.glob("MTD_MSI*.xml")).read_bytes()


def test_l2a_baseline_0400_has_boa_offsets_for_every_band() -> None:
    meta = parse_product_metadata((T29UNU / "MTD_MSIL2A.xml").read_bytes())
    assert meta.level == "L2A"
    assert meta.processing_baseline == "04.00"
    assert meta.offsets == {band: -1000.0 for band in SPECTRAL_BANDS}
    assert meta.quantification == 10000.0
    assert meta.start_time == datetime(2022, 10, 5, 11, 54, 11, 24000, tzinfo=UTC)
    assert meta.spacecraft == "Sentinel-2A"
    assert meta.granule_count == 1


@pytest.mark.parametrize(
    ("name", "level", "baseline"),
    [
        ("S2A_MSIL1C_20200717T221941_R029_T01LAC_20200717T234135", "L1C", "02.09"),
        ("S2A_MSIL1C_20210908T042701_N0301_R133_T46RER_20210908T070248", "L1C", "03.01"),
        ("S2A_MSIL2A_20150826T185436_N0212_R070_T11SLT_20210412T023147", "L2A", "02.12"),
    ],
)
def test_before_baseline_0400_there_are_no_offsets(name: str, level: str, baseline: str) -> None:
    meta = parse_product_metadata(_product(name))
    assert (meta.level, meta.processing_baseline) == (level, baseline)
    assert meta.offsets == {}


@pytest.mark.parametrize(
    "name",
    [
        "S2B_MSIL2A_20220413T150759_N0400_R025_T33XWJ_20220414T082126",
        "S2A_MSIL2A_20230821T221941_N0509_R029_T01KAB_20230822T021825",
    ],
)
def test_l2a_offsets_from_0400_on(name: str) -> None:
    meta = parse_product_metadata(_product(name))
    assert len(meta.offsets) == 13
    assert set(meta.offsets.values()) == {-1000.0}
    assert "AOT" not in meta.offsets and "WVP" not in meta.offsets


def test_l1c_offsets_are_read_from_radio_add_offset() -> None:
    # Baseline 04.00+ L1C metadata: same file as 03.01 with the offset list inserted.
    xml = _product("S2A_MSIL1C_20210908T042701_N0301_R133_T46RER_20210908T070248").decode()
    offsets = "".join(
        f'<RADIO_ADD_OFFSET band_id="{i}">-1000</RADIO_ADD_OFFSET>' for i in range(13)
    )
    xml = xml.replace(
        "</QUANTIFICATION_VALUE>",
        f"</QUANTIFICATION_VALUE><Radiometric_Offset_List>{offsets}</Radiometric_Offset_List>",
        1,
    )
    meta = parse_product_metadata(xml.encode())
    assert (
        meta.offsets["B01"] == -1000.0
        and meta.offsets["B12"] == -1000.0
        and len(meta.offsets) == 13
    )


def test_footprint_is_lon_lat_and_closed() -> None:
    meta = parse_product_metadata((T29UNU / "MTD_MSIL2A.xml").read_bytes())
    assert meta.footprint is not None
    lon, lat = meta.footprint[0]
    assert (lon, lat) == pytest.approx((-7.7604675, 53.24107326120979))
    assert meta.footprint[0] == meta.footprint[-1]


def test_tile_metadata_crs_and_sun() -> None:
    path = next((T29UNU / "GRANULE").glob("*/MTD_TL.xml"))
    tile = parse_tile_metadata(path.read_bytes())
    assert tile.mgrs_tile == "29UNU"
    assert tile.crs == "EPSG:32629"
    assert tile.sun_zenith == pytest.approx(57.820574357679)
    assert tile.sun_azimuth == pytest.approx(172.840206897213)


@pytest.mark.parametrize(
    "path",
    [
        METADATA / "S2A_MSIL1C_20200717T221941_R029_T01LAC_20200717T234135" / "MTD_TL.xml",
        METADATA / "S2A_MSIL2A_20230821T221941_N0509_R029_T01KAB_20230822T021825" / "MTD_TL.xml",
        next((T22HBD / "GRANULE").glob("*/MTD_TL.xml")),
    ],
)
def test_tile_metadata_of_other_baselines(path: object) -> None:
    tile = parse_tile_metadata(path.read_bytes())  # type: ignore[attr-defined]
    assert len(tile.mgrs_tile) == 5
    assert tile.crs.startswith("EPSG:32")
    assert tile.sun_zenith is not None and 0 < tile.sun_zenith < 90


def test_not_xml_and_not_sentinel2_are_clear_errors() -> None:
    with pytest.raises(ProductError, match="not valid XML"):
        parse_product_metadata(b"\x00garbage")
    with pytest.raises(ProductError, match="is not L1C or L2A"):
        parse_product_metadata(
            b"<Landsat_Product><PRODUCT_TYPE>L1TP</PRODUCT_TYPE></Landsat_Product>"
        )
