"""The pygeoapi process ``kappamask``: a thin shell over ``pipeline.run``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pygeoapi.process.base import BaseProcessor, ProcessorExecuteError

from kappamask import __version__
from kappamask.bands import LEVELS, RESOLUTIONS
from kappamask.errors import InvalidInputError, KappaMaskError
from kappamask.inference.triton import TritonClient
from kappamask.pipeline import RunOptions, run
from kappamask.reader import RESAMPLING
from kappamask.sources.local import roots_from_env

LOGGER = logging.getLogger(__name__)

PROCESS_METADATA: dict[str, Any] = {
    "version": __version__,
    "id": "kappamask",
    "title": {"en": "KappaMask: Sentinel-2 cloud and cloud shadow mask"},
    "description": {
        "en": "Classifies every pixel of a Sentinel-2 L1C or L2A product as clear, cloud "
        "shadow, semi-transparent cloud, cloud or missing with the KappaMask U-Nets "
        "(Domnich et al. 2021) and returns a Cloud-Optimized GeoTIFF, a confidence COG, "
        "a PNG preview and a STAC item."
    },
    "jobControlOptions": ["sync-execute", "async-execute"],
    "outputTransmission": ["value"],
    "keywords": ["Sentinel-2", "cloud mask", "cloud shadow", "KappaMask", "U-Net"],
    "links": [
        {
            "type": "text/html",
            "rel": "about",
            "title": "KappaMask: AI-Based Cloudmask Processor for Sentinel-2 "
            "(Remote Sensing 13:4100)",
            "href": "https://doi.org/10.3390/rs13204100",
            "hreflang": "en-US",
        }
    ],
    "inputs": {
        "product": {
            "title": "Sentinel-2 product",
            "description": "Path of a Sentinel-2 L1C or L2A .SAFE folder or .zip, inside the "
            "data roots of the server. The level is read from the product metadata.",
            "schema": {"type": "string", "minLength": 1},
            "minOccurs": 1,
            "maxOccurs": 1,
            "keywords": ["SAFE"],
        },
        "resolution": {
            "title": "Output resolution (m)",
            "description": "Ground sampling distance of the mask; every band is resampled to it.",
            "schema": {"type": "integer", "enum": list(RESOLUTIONS), "default": 10},
            "minOccurs": 0,
            "maxOccurs": 1,
        },
        "resampling": {
            "title": "Resampling",
            "description": "Lanczos (windowed sinc, as in the paper) or bilinear.",
            "schema": {"type": "string", "enum": sorted(RESAMPLING), "default": "lanczos"},
            "minOccurs": 0,
            "maxOccurs": 1,
        },
        "level": {
            "title": "Expected processing level",
            "description": "Fail unless the product is of this level (default: any).",
            "schema": {"type": "string", "enum": list(LEVELS)},
            "minOccurs": 0,
            "maxOccurs": 1,
        },
    },
    "outputs": {
        "result": {
            "title": "Result",
            "description": "Hrefs of the mask COG, confidence COG, preview PNG and STAC item, "
            "with the class percentages.",
            "schema": {"type": "object", "contentMediaType": "application/json"},
        }
    },
    "example": {
        "inputs": {
            "product": "tests/data/s2/"
            "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE",
            "resolution": 60,
        }
    },
}


@dataclass(frozen=True)
class ProcessSettings:
    """Server-side settings of the process, from the pygeoapi resource definition."""

    triton_url: str
    triton_protocol: str
    output_dir: Path
    data_roots: tuple[Path, ...]

    @classmethod
    def from_definition(cls, definition: dict[str, Any]) -> ProcessSettings:
        roots = [Path(p) for p in str(definition.get("data_roots") or "").split(":") if p.strip()]
        return cls(
            triton_url=str(definition.get("triton_url") or "127.0.0.1:8000"),
            triton_protocol=str(definition.get("triton_protocol") or "http"),
            output_dir=Path(str(definition.get("output_dir") or "kappamask-results")),
            data_roots=tuple(roots or roots_from_env()),
        )


def parse_inputs(data: Any) -> tuple[str, RunOptions]:
    """Validate the execute request's inputs; unknown names and wrong types are errors."""
    if not isinstance(data, dict):
        raise InvalidInputError("inputs must be a JSON object")
    unknown = sorted(set(data) - set(PROCESS_METADATA["inputs"]))
    if unknown:
        raise InvalidInputError(f"unknown input(s): {', '.join(unknown)}")
    product = data.get("product")
    if not isinstance(product, str) or not product.strip():
        raise InvalidInputError("input 'product' is required: the path of a .SAFE folder or .zip")
    resolution = data.get("resolution", 10)
    if isinstance(resolution, bool) or resolution not in RESOLUTIONS:
        raise InvalidInputError(f"input 'resolution' must be one of {list(RESOLUTIONS)}")
    resampling = data.get("resampling", "lanczos")
    if resampling not in RESAMPLING:
        raise InvalidInputError(f"input 'resampling' must be one of {sorted(RESAMPLING)}")
    level = data.get("level")
    if level is not None and level not in LEVELS:
        raise InvalidInputError(f"input 'level' must be one of {list(LEVELS)}")
    return product.strip(), RunOptions(
        resolution=int(resolution), resampling=resampling, level=level
    )


def to_process_error(err: KappaMaskError) -> ProcessorExecuteError:
    """A pygeoapi error carrying our message, HTTP status and OGC code."""
    out = ProcessorExecuteError(user_msg=str(err))
    out.http_status_code = err.http_status
    out.ogc_exception_code = err.ogc_code
    return out


class KappaMaskProcessor(BaseProcessor):
    """pygeoapi processor; construction does no I/O (pygeoapi builds one per request)."""

    def __init__(self, processor_def: dict[str, Any]) -> None:
        super().__init__(processor_def, PROCESS_METADATA)
        self.settings = ProcessSettings.from_definition(processor_def)

    def execute(
        self, data: dict[str, Any], outputs: dict[str, Any] | None = None
    ) -> tuple[str, Any]:
        try:
            product, options = parse_inputs(data)
            with TritonClient(self.settings.triton_url, self.settings.triton_protocol) as client:
                result = run(
                    product,
                    self.settings.output_dir,
                    client,
                    options,
                    progress=lambda p, m: LOGGER.info("%d%% %s", p, m),
                    allowed_roots=self.settings.data_roots,
                )
        except KappaMaskError as err:
            LOGGER.warning("kappamask failed: %s", err)
            raise to_process_error(err) from err
        return "application/json", result.to_json()

    def __repr__(self) -> str:
        return f"<KappaMaskProcessor> {self.name}"
