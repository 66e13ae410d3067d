"""The STAC item of a mask: a pure function of the source product, the grid, the class
statistics, the written files and the model that produced them (``create_item``), and
what a published item says of its result, read back (``read_item``)."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pystac
from rasterio.warp import transform_geom
from shapely.geometry import Polygon, box, mapping, shape

from kappamask import __version__
from kappamask.bands import (
    CLASS_COLORS,
    CLASS_DESCRIPTIONS,
    CLASS_NAMES,
    OUTPUT_CLASSES,
    VALID_CLEAR,
    VALID_NODATA,
    VALID_UNUSABLE,
    MaskClass,
)
from kappamask.geometry.grid import Grid
from kappamask.inference.model_spec import (
    ORIGIN_BOOTSTRAP,
    ORIGIN_FINE_TUNED,
    ORIGIN_IMPORTED,
    ORIGIN_OFFICIAL,
    PROBABILITY_NODATA,
    ModelSpec,
)
from kappamask.sources.product import Product

EXT_PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
EXT_RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
EXT_FILE = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
EXT_EO = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
EXT_PROCESSING = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
EXT_CLASSIFICATION = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


@dataclass(frozen=True)
class WrittenFile:
    """A file of the result: where the item points to it, its size and checksum."""

    href: str
    size: int
    checksum: str


def describe_file(path: Path, href: str) -> WrittenFile:
    """Size and SHA2-256 multihash (as the file extension wants) of a written file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return WrittenFile(href, path.stat().st_size, "1220" + digest.hexdigest())


def class_statistics(counts: np.ndarray, area_pixels: int | None = None) -> dict[str, float]:
    """Percentages per class from a bincount of mask codes.

    Real classes are percentages of the pixels with data; ``missing`` of all pixels of the
    mask, or, with ``area_pixels`` (the pixels inside the user's bbox/aoi), of those: the
    pixels outside the area are not missing data, only not asked for. ``eo:cloud_cover``
    counts opaque and semi-transparent cloud.
    """
    counts = np.asarray(counts, dtype=np.float64)
    valid = counts.sum() - counts[MaskClass.MISSING]
    total = float(area_pixels) if area_pixels is not None else counts.sum()
    stats = {"missing": 100.0 * max(0.0, total - valid) / total if total else 0.0}
    for cls in OUTPUT_CLASSES[1:]:
        stats[CLASS_NAMES[cls]] = 100.0 * counts[cls] / valid if valid else 0.0
    stats["cloud_cover"] = (
        stats[CLASS_NAMES[MaskClass.CLOUD]] + stats[CLASS_NAMES[MaskClass.SEMI_TRANSPARENT_CLOUD]]
    )
    return {k: round(float(v), 4) for k, v in stats.items()}


def _geometry(product: Product, grid: Grid) -> dict[str, Any]:
    area = box(*grid.bounds)
    grid_wgs84 = shape(transform_geom(grid.crs, "EPSG:4326", mapping(area)))
    if product.footprint:
        footprint = Polygon(product.footprint)
        if footprint.is_valid and footprint.intersects(grid_wgs84):
            grid_wgs84 = grid_wgs84.intersection(footprint)
    return dict(mapping(grid_wgs84.simplify(0)))


def _classes() -> list[dict[str, Any]]:
    return [
        {
            "value": int(cls),
            "name": CLASS_NAMES[cls],
            "description": CLASS_DESCRIPTIONS[cls],
            "color_hint": "{:02X}{:02X}{:02X}".format(*CLASS_COLORS[cls][:3]),
            **({"nodata": True} if cls == MaskClass.MISSING else {}),
        }
        for cls in OUTPUT_CLASSES
    ]


#: How the lineage names each architecture (ModelSpec.architecture).
_NETWORKS = {"unet": "U-Net", "deeplabv3plus": "DeepLabv3+ (km_predict's)"}
#: How the lineage names each origin of weights (ModelSpec.origin).
_WEIGHTS: defaultdict[str, str] = defaultdict(
    lambda: "weights of unrecorded origin",
    {
        ORIGIN_OFFICIAL: "KappaZeta's published weights",
        ORIGIN_BOOTSTRAP: "this project's bootstrap weights, not KappaZeta's published ones",
        ORIGIN_IMPORTED: "weights imported from a Keras file",
        ORIGIN_FINE_TUNED: "weights fine-tuned on people's labels from a parent model",
    },
)


#: Product hrefs a client elsewhere can follow.
URL_SCHEMES = ("http", "https", "s3")


def create_item(
    product: Product,
    grid: Grid,
    stats: Mapping[str, float],
    files: Mapping[str, WrittenFile],
    model: ModelSpec,
    substitutions: Mapping[str, str],
    processed: datetime | None = None,
    extra_properties: Mapping[str, Any] | None = None,
    local_paths: bool = True,
) -> pystac.Item:
    """Build the STAC item describing a mask of ``product`` (``stats``: class_statistics;
    files: mask, confidence, probability, valid, preview). ``local_paths``: the item is
    read on the machine that made it (a folder of the command line), where the product's
    path is worth a ``derived_from`` link."""
    geometry = _geometry(product, grid)
    item = pystac.Item(
        id=f"{product.product_id}_KAPPAMASK",
        geometry=geometry,
        bbox=list(shape(geometry).bounds),
        datetime=product.sensing_time,
        properties={},
        stac_extensions=[
            EXT_PROJECTION,
            EXT_RASTER,
            EXT_FILE,
            EXT_EO,
            EXT_PROCESSING,
            EXT_CLASSIFICATION,
        ],
    )
    props = item.properties
    props.update(
        {
            "platform": product.spacecraft.lower(),
            "constellation": "sentinel-2",
            "instruments": ["msi"],
            "eo:cloud_cover": stats["cloud_cover"],
            "proj:code": grid.crs,
            "proj:shape": [grid.height, grid.width],
            "proj:transform": list(grid.transform)[:6],
            "proj:bbox": list(grid.bounds),
            "processing:level": "L2",
            "processing:datetime": (processed or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "processing:software": {
                "kappamask": __version__,
                model.name: model.version_label,
                **({"triton-runtime": model.runtime_description()} if model.runtime else {}),
            },
            "processing:lineage": (
                f"KappaMask {_NETWORKS.get(model.architecture, model.architecture)} "
                f"({model.name}, {model.version_label}, {_WEIGHTS[model.origin]}) "
                f"applied to {product.level} product {product.product_id} resampled to "
                f"{grid.resolution:g} m; class codes follow Domnich et al. 2021 (0 = missing; "
                "km_predict v2 wrote 5)."
            ),
            "kappamask:model": model.provenance(),
            "kappamask:source_level": product.level,
            "kappamask:processing_baseline": product.processing_baseline,
            "kappamask:mgrs_tile": product.mgrs_tile,
            "kappamask:resolution": grid.resolution,
        }
    )
    for name, value in stats.items():
        if name != "cloud_cover":
            props[f"kappamask:{name}_percentage"] = value
    if substitutions:
        props["kappamask:substituted_bands"] = dict(substitutions)
    props.update(extra_properties or {})

    def add(key: str, title: str, media: str, roles: list[str], extra: dict[str, Any]) -> None:
        f = files[key]
        asset = pystac.Asset(
            href=f.href,
            title=title,
            media_type=media,
            roles=roles,
            extra_fields={"file:size": f.size, "file:checksum": f.checksum, **extra},
        )
        item.add_asset(key, asset)

    band = {
        "data_type": "uint8",
        "nodata": 0,
        "spatial_resolution": grid.resolution,
        "sampling": "area",
    }
    add(
        "mask",
        "Cloud mask (KappaMask classes, buffers applied)",
        COG_MEDIA_TYPE,
        ["data", "cloud", "cloud-shadow"],
        {"raster:bands": [band], "classification:classes": _classes()},
    )
    add(
        "confidence",
        "Confidence of the winning class (x 255)",
        COG_MEDIA_TYPE,
        ["data"],
        {"raster:bands": [{**band, "scale": 1 / 255, "offset": 0.0, "unit": "1"}]},
    )
    add(
        "probability",
        "Cloud probability (%): max(sigmoid semi-transparent, sigmoid cloud) over it plus "
        "max(sigmoid clear, sigmoid shadow); above 50 where the mask says cloud",
        COG_MEDIA_TYPE,
        ["data", "cloud"],
        {
            "raster:bands": [
                {
                    **band,
                    "nodata": PROBABILITY_NODATA,
                    "sampling": "area",
                    "scale": 0.01,
                    "offset": 0.0,
                    "unit": "1",
                }
            ]
        },
    )
    add(
        "valid",
        "Usable pixels: 1 clear, 0 cloud, shadow or a buffer around them",
        COG_MEDIA_TYPE,
        ["data-mask"],
        {
            "raster:bands": [{**band, "nodata": VALID_NODATA}],
            "classification:classes": [
                {
                    "value": VALID_CLEAR,
                    "name": "usable",
                    "color_hint": "2EA043",
                    "description": "Clear, outside every cloud and shadow buffer",
                },
                {
                    "value": VALID_UNUSABLE,
                    "name": "unusable",
                    "color_hint": "000000",
                    "description": "Cloud, semi-transparent cloud, shadow or their buffers",
                },
                {
                    "value": VALID_NODATA,
                    "name": "no_data",
                    "nodata": True,
                    "description": "No data, or outside the bbox/aoi",
                },
            ],
        },
    )
    add("preview", "Mask over a true-colour quicklook", "image/png", ["overview"], {})
    # the product it was made from: a URL anyone can follow; a path only where the item
    # is read on the machine that made it (served over HTTP or on S3, a server path would
    # lead a client nowhere: kappamask:product_id names the product there)
    if product.href and (urlparse(product.href).scheme in URL_SCHEMES or local_paths):
        item.add_link(pystac.Link("derived_from", product.href, title=product.product_id))
    return item


@dataclass(frozen=True)
class RecordedResult:
    """What a published item records of its result (the inverse of ``create_item``)."""

    parameters: dict[str, Any]
    product_id: str
    level: str
    statistics: dict[str, float]
    crops_total: int
    model_provenance: dict[str, str]


def read_item(raw: bytes | str) -> RecordedResult | None:
    """The result an item written by ``create_item`` describes; None when it is not one."""
    try:
        props = json.loads(raw)["properties"]
        stats = {
            key.removeprefix("kappamask:").removesuffix("_percentage"): float(value)
            for key, value in props.items()
            if key.startswith("kappamask:") and key.endswith("_percentage")
        }
        stats["cloud_cover"] = float(props.get("eo:cloud_cover", 0.0))
        return RecordedResult(
            parameters=dict(props["kappamask:parameters"]),
            product_id=str(props.get("kappamask:product_id", "")),
            level=str(props.get("kappamask:source_level", "")),
            statistics=stats,
            crops_total=int(props.get("kappamask:crops", {}).get("total", 0)),
            model_provenance=dict(props.get("kappamask:model") or {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
