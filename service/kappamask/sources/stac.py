"""Sentinel-2 STAC items (Earth Search v0/v1, Planetary Computer, CDSE) into a Product.

Bands are found by asset key (``B01``.. ``B12``, ``AOT``, ``WVP``, ``SCL``, or Earth Search
v1's ``coastal``, ``rededge1``.. ``swir22``) or by the names in ``eo:bands``; COG assets are
preferred over JPEG 2000 duplicates. ``raster:bands`` scale and offset are honoured; items
without them get ESA's baseline rule (offset -1000 DN from baseline 04.00 on).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import pystac
import requests
from rasterio.crs import CRS
from rasterio.errors import CRSError

from kappamask.access import AccessPolicy, product_name
from kappamask.bands import (
    AUX_BANDS,
    BASELINE_04_OFFSET_DN,
    NATIVE_RESOLUTION,
    SPECTRAL_BANDS,
    STAC_BAND_ALIASES,
)
from kappamask.errors import (
    AccessDeniedError,
    InvalidInputError,
    ProductError,
    ProductNotFoundError,
    StorageError,
)
from kappamask.sources.product import Product
from kappamask.storage.s3 import s3_errors, split_s3_url

LOGGER = logging.getLogger(__name__)

LAYERS = (*SPECTRAL_BANDS, *AUX_BANDS, "SCL")
_LAYER_NAMES = {name.upper(): name for name in LAYERS}
_MAX_REDIRECTS = 5
_TIMEOUT = 30
#: Largest STAC item document read (Earth Search's and Planetary Computer's are 10-40 kB).
MAX_ITEM_BYTES = 4 * 2**20
#: Seconds a STAC item document may take to arrive, whole.
READ_DEADLINE_S = 60.0
_BASELINE_IN_ID = re.compile(r"_N(\d{2})(\d{2})_")
_TILE_IN_ID = re.compile(r"_T(\d{2}[A-Z]{3})_")
#: GDAL options for band files read over HTTP.
HTTP_GDAL_ENV = {
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    # a read that stalls fails (502) instead of holding an inference slot for ever: one
    # ranged GET of a band is a few MB
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
    "GDAL_HTTP_TIMEOUT": "120",
}


def _layer_of(key: str, asset: pystac.Asset) -> tuple[str, int] | None:
    """(layer, preference) of an asset; lower preference wins (COG over JP2 copies)."""
    base = key.removesuffix("-jp2")
    rank = 1 if base != key or (asset.media_type or "").startswith("image/jp2") else 0
    layer = _LAYER_NAMES.get(base.upper()) or STAC_BAND_ALIASES.get(base.lower())
    if layer is None:
        bands = asset.extra_fields.get("eo:bands") or []
        if len(bands) == 1:
            name = str(bands[0].get("name", ""))
            layer = _LAYER_NAMES.get(name.upper())
    if layer is None or not (asset.media_type or "image/").startswith("image/"):
        return None
    return layer, rank


def _resolution(layer: str, asset: pystac.Asset) -> int:
    raster = (asset.extra_fields.get("raster:bands") or [{}])[0]
    for value in (raster.get("spatial_resolution"), asset.extra_fields.get("gsd")):
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e4:
            return round(value)
    transform = asset.extra_fields.get("proj:transform")
    if isinstance(transform, list) and transform:
        size = abs(_number(transform[0], "proj:transform"))
        if 0 < size < 1e4:
            return round(size)
    return NATIVE_RESOLUTION[layer]


def _baseline(props: Mapping[str, Any], product_id: str) -> str:
    value = props.get("s2:processing_baseline") or props.get("processing:version")
    if value:
        return str(value)
    match = _BASELINE_IN_ID.search(product_id)
    return f"{match.group(1)}.{match.group(2)}" if match else ""


def _level(item: pystac.Item, product_id: str) -> str:
    text = " ".join(
        str(v)
        for v in (
            item.properties.get("s2:product_type"),
            item.properties.get("processing:level"),
            item.collection_id,
            product_id,
        )
        if v
    ).upper()
    found = {
        level
        for level, marks in (("L1C", ("L1C", "1C")), ("L2A", ("L2A", "2A")))
        if any(m in text for m in marks)
    }
    if len(found) != 1:
        raise ProductError(f"STAC item {item.id}: cannot tell whether it is L1C or L2A")
    return found.pop()


def _mgrs_tile(props: Mapping[str, Any], product_id: str) -> str:
    if props.get("s2:mgrs_tile"):
        return str(props["s2:mgrs_tile"])
    if props.get("mgrs:utm_zone"):
        return (
            f"{int(props['mgrs:utm_zone']):02d}{props.get('mgrs:latitude_band', '')}"
            f"{props.get('mgrs:grid_square', '')}"
        )
    if props.get("sentinel:utm_zone"):
        return (
            f"{int(props['sentinel:utm_zone']):02d}{props.get('sentinel:latitude_band', '')}"
            f"{props.get('sentinel:grid_square', '')}"
        )
    match = _TILE_IN_ID.search(product_id)
    return match.group(1) if match else ""


def _crs(item: pystac.Item) -> str:
    props = item.properties
    if props.get("proj:code"):
        code = str(props["proj:code"])
        try:
            CRS.from_user_input(code)
        except CRSError as err:  # pystac writes a legacy proj:epsg "abc" as "EPSG:abc"
            raise ValueError(f"proj:code {code[:40]!r} is not a CRS") from err
        return code
    if props.get("proj:epsg"):
        return f"EPSG:{int(_number(props['proj:epsg'], 'proj:epsg'))}"
    for asset in item.assets.values():
        if asset.extra_fields.get("proj:epsg"):
            return f"EPSG:{int(_number(asset.extra_fields['proj:epsg'], 'proj:epsg'))}"
    return ""


def _asset_href(asset: pystac.Asset) -> str:
    """Absolute hrefs (URLs, absolute paths) as written; relative ones from the item's."""
    href = asset.href
    if urlsplit(href).scheme or href.startswith("/"):
        return href
    return asset.get_absolute_href() or href


def _gdal_path(href: str, policy: AccessPolicy) -> str:
    scheme = urlsplit(href).scheme
    if scheme in {"http", "https"}:
        return "/vsicurl/" + policy.url(href)
    if scheme == "s3":
        bucket, key = split_s3_url(href)
        return f"/vsis3/{bucket}/{key}"
    if scheme and len(scheme) > 1:
        raise InvalidInputError(f"asset href scheme {scheme}:// is not supported")
    return str(policy.local_input(href))


def is_sentinel2(props: Mapping[str, Any]) -> bool:
    """Whether an item's properties describe a Sentinel-2 product (platform, constellation
    or the s2 extension: catalogs spell it differently)."""
    return (
        str(props.get("platform", "")).lower().startswith("sentinel-2")
        or str(props.get("constellation", "")).lower().replace(" ", "-") == "sentinel-2"
        or any(k.startswith("s2:") for k in props)
    )


def product_from_item(item: pystac.Item, policy: AccessPolicy, href: str = "") -> Product:
    """The Product a Sentinel-2 STAC item describes (its band assets, level, offsets).

    An item is JSON from anywhere: a field of the wrong type or shape (``proj:epsg:
    "abc"``, a geometry that is no polygon) is the product's fault (422), never a 500."""
    try:
        return _product_from_item(item, policy, href)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as err:
        raise ProductError(
            f"STAC item {str(item.id)[:80]!r} has malformed metadata: "
            f"{type(err).__name__}: {str(err)[:200]}"
        ) from err


def _number(value: Any, name: str) -> float:
    """A numeric field of an item, or ValueError naming it (strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return float(value)


def _product_from_item(item: pystac.Item, policy: AccessPolicy, href: str) -> Product:
    props = item.properties
    platform = str(props.get("platform", ""))
    if not is_sentinel2(props):
        raise ProductError(f"STAC item {item.id} does not describe a Sentinel-2 product")
    product_id = str(
        props.get("s2:product_uri") or props.get("sentinel:product_id") or item.id
    ).removesuffix(".SAFE")
    product_name(product_id)  # before any asset is looked at: the id names the files
    level = _level(item, product_id)
    baseline = _baseline(props, product_id)

    chosen: dict[str, tuple[int, str, pystac.Asset]] = {}
    for key, asset in item.assets.items():
        found = _layer_of(key, asset)
        if found and (found[0] not in chosen or found[1] < chosen[found[0]][0]):
            chosen[found[0]] = (found[1], key, asset)
    if not any(layer in chosen for layer in SPECTRAL_BANDS):
        raise ProductError(f"STAC item {item.id} has no Sentinel-2 band assets")

    band_files: dict[str, dict[int, str]] = {}
    offsets: dict[str, float] = {}
    gains: dict[str, float] = {}
    quantification = 10000.0
    stated = False
    for layer, (_rank, _key, asset) in chosen.items():
        band_files[layer] = {_resolution(layer, asset): _gdal_path(_asset_href(asset), policy)}
        raster = (asset.extra_fields.get("raster:bands") or [{}])[0]
        if layer in SPECTRAL_BANDS and ("scale" in raster or "offset" in raster):
            stated = True
            scale = _number(raster.get("scale", 1.0 / quantification), "raster:bands scale")
            if scale == 0:
                raise ValueError("raster:bands scale must not be 0")
            offsets[layer] = _number(raster.get("offset", 0.0), "raster:bands offset") / scale
            gains[layer] = scale * quantification
    if not stated and baseline >= "04.00":
        offsets = {b: BASELINE_04_OFFSET_DN for b in SPECTRAL_BANDS if b in band_files}
    # (DN * gain + offset / scale * gain) is what the reader computes; keep offsets in
    # quantification units.
    offsets = {b: off * gains.get(b, 1.0) for b, off in offsets.items()}
    gains = {b: g for b, g in gains.items() if abs(g - 1.0) > 1e-9}

    uses_s3 = any(p.startswith("/vsis3/") for files in band_files.values() for p in files.values())
    gdal_env = dict(HTTP_GDAL_ENV)
    s3 = policy.s3 if uses_s3 else None
    zenith = props.get("s2:mean_solar_zenith")
    if zenith is not None:
        zenith = _number(zenith, "s2:mean_solar_zenith")
    elif props.get("view:sun_elevation") is not None:
        zenith = 90.0 - _number(props["view:sun_elevation"], "view:sun_elevation")
    azimuth = props.get("s2:mean_solar_azimuth", props.get("view:sun_azimuth"))
    if azimuth is not None:
        azimuth = _number(azimuth, "view:sun_azimuth")
    geometry = item.geometry or {}
    footprint = None
    if geometry.get("type") == "Polygon":
        footprint = tuple(
            (_number(x, "geometry"), _number(y, "geometry"))
            for x, y, *_ in geometry["coordinates"][0]
        )
    sensing = item.datetime or datetime.fromisoformat(
        str(props.get("start_datetime", "1970-01-01T00:00:00Z")).replace("Z", "+00:00")
    )
    LOGGER.info(
        "STAC item %s: %s baseline %s, %d layers", item.id, level, baseline or "?", len(chosen)
    )
    return Product(
        product_id=product_id,
        level=level,
        processing_baseline=baseline,
        sensing_time=sensing if sensing.tzinfo else sensing.replace(tzinfo=UTC),
        spacecraft=platform.replace("sentinel", "Sentinel") if platform else "Sentinel-2",
        mgrs_tile=_mgrs_tile(props, product_id),
        crs=_crs(item),
        band_files=band_files,
        offsets=offsets,
        quantification=quantification,
        footprint=footprint,
        sun_azimuth=float(azimuth) if azimuth is not None else None,
        sun_zenith=float(zenith) if zenith is not None else None,
        href=href or item.get_self_href() or "",
        gdal_env=gdal_env,
        s3=s3,
        gains=gains,
    )


def item_from_dict(data: Mapping[str, Any], href: str | None = None) -> pystac.Item:
    """A pystac Item from JSON, with a clear error when it is not one."""
    if not isinstance(data, Mapping) or data.get("type") != "Feature" or "assets" not in data:
        raise InvalidInputError(
            "the product object is not a STAC item (a GeoJSON Feature with assets)"
        )
    try:
        item = pystac.Item.from_dict(dict(data), href=href, preserve_dict=True)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, pystac.STACError) as err:
        raise InvalidInputError(f"the product object is not a valid STAC item: {err}") from err
    if href:
        item.set_self_href(href)
    return item


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProductError(f"{where} is not JSON: {err}") from err


def fetch_item(href: str, policy: AccessPolicy) -> pystac.Item:
    """Load a STAC item from an http(s) URL, an s3:// key or a local file."""
    scheme = urlsplit(href).scheme
    if scheme in {"http", "https"}:
        url = href
        for _ in range(_MAX_REDIRECTS + 1):
            policy.url(url)  # every hop is checked, not only the first
            try:
                response = requests.get(
                    url,
                    timeout=_TIMEOUT,
                    allow_redirects=False,
                    stream=True,  # read below, capped: never a whole 64 MiB "item"
                    headers={"Accept": "application/geo+json, application/json"},
                )
            except requests.RequestException as err:
                raise StorageError(f"cannot fetch the STAC item {href}: {err}") from err
            if response.is_redirect:
                response.close()
                url = urljoin(url, response.headers["Location"])
                continue
            break
        else:
            raise StorageError(f"{href}: too many redirects")
        with response:
            if response.status_code == 404:
                raise ProductNotFoundError(f"STAC item {href} does not exist (404)")
            if response.status_code in {401, 403}:
                raise AccessDeniedError(f"STAC item {href}: access denied ({response.status_code})")
            if response.status_code != 200:
                raise StorageError(f"STAC item {href}: the server answered {response.status_code}")
            raw = read_capped(response, href, MAX_ITEM_BYTES)
        return item_from_dict(_parse_json(raw, href), url)
    if scheme == "s3":
        bucket, key = split_s3_url(href)
        with s3_errors(href):
            stream = policy.s3.client().get_object(
                Bucket=bucket, Key=key, **policy.s3.request_extra()
            )["Body"]
            body = stream.read(MAX_ITEM_BYTES + 1)
            stream.close()
        if len(body) > MAX_ITEM_BYTES:
            raise ProductError(f"{href} is larger than {MAX_ITEM_BYTES} bytes: not a STAC item")
        return item_from_dict(_parse_json(body, href), href)
    path = policy.local_input(href)
    if not path.is_file():
        raise ProductNotFoundError(f"STAC item {href} does not exist")
    if path.stat().st_size > MAX_ITEM_BYTES:
        raise ProductError(f"{href} is larger than {MAX_ITEM_BYTES} bytes: not a STAC item")
    return item_from_dict(_parse_json(path.read_bytes(), href), str(path))


def read_capped(response: requests.Response, what: str, limit: int) -> bytes:
    """The body of a streamed ``response``, refused past ``limit`` bytes or past
    ``READ_DEADLINE_S`` in all (a server that trickles): never held whole in memory."""
    deadline = time.monotonic() + READ_DEADLINE_S
    chunks, size = [], 0
    try:
        for chunk in response.iter_content(65536):
            size += len(chunk)
            if size > limit:
                raise ProductError(f"{what} is larger than {limit} bytes: not a STAC item")
            if time.monotonic() > deadline:
                raise StorageError(f"{what} did not arrive within {READ_DEADLINE_S:g} s")
            chunks.append(chunk)
    except requests.RequestException as err:
        raise StorageError(f"cannot read {what}: {err}") from err
    return b"".join(chunks)
