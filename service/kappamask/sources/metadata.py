"""Parsers of the two Sentinel-2 metadata files: the product MTD_MSIL1C/2A.xml and MTD_TL.xml.

Namespace-agnostic on purpose: the namespaces changed with nearly every product
specification (PSD) version since 2015, the element names did not.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime

from kappamask.bands import SPECTRAL_BANDS
from kappamask.errors import ProductError


@dataclass(frozen=True)
class ProductMetadata:
    """What MTD_MSIL1C.xml / MTD_MSIL2A.xml say about the product."""

    product_uri: str
    level: str
    processing_baseline: str
    start_time: datetime
    spacecraft: str
    quantification: float
    offsets: dict[str, float]
    footprint: tuple[tuple[float, float], ...] | None
    granule_count: int


@dataclass(frozen=True)
class TileMetadata:
    """What MTD_TL.xml says about the tile."""

    tile_id: str
    mgrs_tile: str
    sensing_time: datetime
    crs: str
    # The tile's Geoposition/Size are not kept: the output grid comes from the band files,
    # which are what is read (a product whose bands were cut, as the T29UNU test fixture's
    # are, still names the whole tile here).
    sun_zenith: float | None
    sun_azimuth: float | None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_xml(data: bytes, name: str) -> ET.Element:
    try:
        return ET.fromstring(data)
    except ET.ParseError as err:
        raise ProductError(f"{name} is not valid XML ({err})") from err


def _iter(root: ET.Element, tag: str) -> list[ET.Element]:
    return [el for el in root.iter() if _local(el.tag) == tag]


def _text(root: ET.Element, tag: str, name: str, default: str | None = None) -> str:
    for el in _iter(root, tag):
        if el.text and el.text.strip():
            return el.text.strip()
    if default is not None:
        return default
    raise ProductError(f"{name} has no {tag} element: not a Sentinel-2 product metadata file")


def parse_datetime(value: str) -> datetime:
    """Parse the ISO times of Sentinel-2 metadata (with Z, with 3 or 6 decimals)."""
    value = value.strip().replace("Z", "+00:00")
    # Python 3.11 accepts any fraction length, but older products have none at all.
    return datetime.fromisoformat(value)


def _level(root: ET.Element, name: str) -> str:
    candidates = [
        _text(root, "PRODUCT_TYPE", name, default=""),
        _text(root, "PROCESSING_LEVEL", name, default=""),
        _local(root.tag),
    ]
    for value in candidates:
        v = value.upper()
        if "1C" in v:
            return "L1C"
        if "2A" in v:
            return "L2A"
    raise ProductError(
        f"{name}: processing level {candidates[1] or candidates[0]!r} is not L1C or L2A"
    )


def _offsets(root: ET.Element, level: str) -> dict[str, float]:
    # L1C from baseline 04.00: Radiometric_Offset_List/RADIO_ADD_OFFSET;
    # L2A: BOA_ADD_OFFSET_VALUES_LIST/BOA_ADD_OFFSET. Both keyed by band_id 0..12.
    tag = "RADIO_ADD_OFFSET" if level == "L1C" else "BOA_ADD_OFFSET"
    offsets: dict[str, float] = {}
    for el in _iter(root, tag):
        band_id = el.get("band_id") or el.get("bandId")
        if band_id is None or el.text is None:
            continue
        index = int(band_id)
        if 0 <= index < len(SPECTRAL_BANDS):
            offsets[SPECTRAL_BANDS[index]] = float(el.text)
    return offsets


def _footprint(root: ET.Element) -> tuple[tuple[float, float], ...] | None:
    for el in _iter(root, "EXT_POS_LIST"):
        if not el.text:
            continue
        values = [float(v) for v in el.text.split()]
        # EXT_POS_LIST is "lat lon lat lon ..."
        ring = tuple((values[i + 1], values[i]) for i in range(0, len(values) - 1, 2))
        if len(ring) >= 4:
            if ring[0] != ring[-1]:
                ring = (*ring, ring[0])
            return ring
    return None


def parse_product_metadata(data: bytes, name: str = "MTD_MSI.xml") -> ProductMetadata:
    """Parse a product metadata file (MTD_MSIL1C.xml, MTD_MSIL2A.xml or the pre-2017 SAFL1C)."""
    root = _parse_xml(data, name)
    level = _level(root, name)
    quant_tag = "QUANTIFICATION_VALUE" if level == "L1C" else "BOA_QUANTIFICATION_VALUE"
    baseline = _text(root, "PROCESSING_BASELINE", name, default="")
    if not baseline:
        match = re.search(r"_N(\d\d)(\d\d)_", _text(root, "PRODUCT_URI", name, default=""))
        baseline = f"{match.group(1)}.{match.group(2)}" if match else "unknown"
    return ProductMetadata(
        product_uri=_text(root, "PRODUCT_URI", name, default=_text(root, "PRODUCT_ID", name, "")),
        level=level,
        processing_baseline=baseline,
        start_time=parse_datetime(_text(root, "PRODUCT_START_TIME", name)),
        spacecraft=_text(root, "SPACECRAFT_NAME", name, default="Sentinel-2"),
        quantification=float(_text(root, quant_tag, name, default="10000")),
        offsets=_offsets(root, level),
        footprint=_footprint(root),
        granule_count=max(1, len(_iter(root, "Granule")) or len(_iter(root, "Granules"))),
    )


def parse_tile_metadata(data: bytes, name: str = "MTD_TL.xml") -> TileMetadata:
    """Parse a granule metadata file (MTD_TL.xml or the pre-2017 ``*_MTD_L1C_TL_*.xml``)."""
    root = _parse_xml(data, name)
    tile_id = _text(root, "TILE_ID", name)
    match = re.search(r"_T(\d{2}[A-Z]{3})_", tile_id + "_")
    sun = _iter(root, "Mean_Sun_Angle")
    zenith = azimuth = None
    if sun:
        zenith = float(_text(sun[0], "ZENITH_ANGLE", name))
        azimuth = float(_text(sun[0], "AZIMUTH_ANGLE", name))
    return TileMetadata(
        tile_id=tile_id,
        mgrs_tile=match.group(1) if match else "",
        sensing_time=parse_datetime(_text(root, "SENSING_TIME", name)),
        crs=_text(root, "HORIZONTAL_CS_CODE", name),
        sun_zenith=zenith,
        sun_azimuth=azimuth,
    )
