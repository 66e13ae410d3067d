"""What a user may choose about a run: one contract for the CLI and the process.

Every option is declared once, in ``RunOptions`` (default, allowed values, checks); the
process's JSON schema (process.py) and the CLI's flags (cli.py) take their defaults and
choices from here, and both build a ``RunOptions``, whose checks raise InvalidInputError
naming the input: the same message whichever way a user asked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shapely.geometry.base import BaseGeometry

from kappamask.access import has_lone_surrogate
from kappamask.bands import DEFAULT_RESOLUTION, LEVELS, MAX_BUFFER_M, RESOLUTIONS
from kappamask.errors import InvalidInputError
from kappamask.geometry.aoi import parse_area
from kappamask.inference.model_spec import ModelSpec

#: Resampling to the output grid: Lanczos (windowed sinc, as in the paper) or bilinear.
RESAMPLING_METHODS = ("bilinear", "lanczos")
#: The process's ``level`` for "whatever the metadata says".
LEVEL_AUTO = "auto"
#: Longest string input accepted (a path, URL or s3:// key is far shorter).
MAX_TEXT = 2048
#: A model as Triton names it, optionally with a version label after a colon.
MODEL_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}(:[A-Za-z0-9_.+-]{1,128})?")


def text_input(data: Mapping[str, Any], name: str, what: str) -> str | None:
    """The string input ``name`` stripped (None when absent); refused when empty, too
    long or holding control characters. The message never echoes the value."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"input '{name}' must be {what}")
    value = value.strip()
    if len(value) > MAX_TEXT:
        raise InvalidInputError(f"input '{name}' is {len(value)} characters long; at most "
                                f"{MAX_TEXT} are accepted")  # fmt: skip
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInputError(f"input '{name}' holds control characters")
    if has_lone_surrogate(value):
        raise InvalidInputError(f"input '{name}' holds a lone UTF-16 surrogate: not text")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunOptions:
    """What a user may choose about a run; constructing one checks it."""

    resolution: int = DEFAULT_RESOLUTION
    resampling: str = "lanczos"
    #: The level the user expects; None: whatever the metadata says.
    level: str | None = None
    #: [west, south, east, north] in degrees, or a GeoJSON (Multi)Polygon in EPSG:4326.
    bbox: tuple[float, float, float, float] | None = None
    aoi: dict[str, Any] | None = None
    #: A model of the repository (``name`` or ``name:version_label``); None: the level's.
    model: str | None = None
    #: Compute again even when the output holds a result for the same parameters.
    overwrite: bool = False
    #: Metres by which clouds (opaque and semi-transparent) and cloud shadows are grown.
    cloud_buffer: float = 0.0
    shadow_buffer: float = 0.0
    #: Turn cloud shadow that no cloud of the product could cast into clear
    #: (kappamask.assembly.postprocess.ShadowCheck).
    shadow_check: bool = True
    #: The bbox or aoi as a geometry in EPSG:4326 (None: the whole product).
    area: BaseGeometry | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or self.resolution not in RESOLUTIONS:
            raise InvalidInputError(f"input 'resolution' must be one of {list(RESOLUTIONS)}")
        object.__setattr__(self, "resolution", int(self.resolution))
        if self.resampling not in RESAMPLING_METHODS:
            raise InvalidInputError(f"input 'resampling' must be one of {list(RESAMPLING_METHODS)}")
        if self.level is not None and self.level not in LEVELS:
            raise InvalidInputError(f"input 'level' must be one of {[LEVEL_AUTO, *LEVELS]}")
        if self.aoi is not None and not isinstance(self.aoi, dict):
            raise InvalidInputError("input 'aoi' must be a GeoJSON object")
        object.__setattr__(self, "area", parse_area(self.bbox, self.aoi))
        if self.bbox is not None:
            object.__setattr__(self, "bbox", tuple(float(v) for v in self.bbox))
        if self.model is not None and not MODEL_PATTERN.fullmatch(self.model):
            raise InvalidInputError(
                "input 'model' must be a model name (letters, digits, '_', '.', '-'), optionally "
                "followed by ':' and a version label"
            )
        for name in ("overwrite", "shadow_check"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"input '{name}' must be true or false")
        for name in ("cloud_buffer", "shadow_buffer"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= MAX_BUFFER_M:
                raise InvalidInputError(
                    f"input '{name}' must be a number of metres from 0 to {MAX_BUFFER_M:g}"
                )
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_inputs(cls, data: Mapping[str, Any]) -> RunOptions:
        """The options among an execute request's inputs (JSON as the process receives
        it: ``level`` "auto", ``bbox`` as an array or an OGC bbox object)."""
        defaults = cls()
        level = data.get("level", LEVEL_AUTO)
        return cls(
            resolution=data.get("resolution", defaults.resolution),
            resampling=data.get("resampling", defaults.resampling),
            level=None if level == LEVEL_AUTO else level,
            bbox=_ogc_bbox(data.get("bbox")),
            aoi=data.get("aoi"),
            model=text_input(data, "model", "a model name"),
            overwrite=data.get("overwrite", defaults.overwrite),
            cloud_buffer=data.get("cloud_buffer", defaults.cloud_buffer),
            shadow_buffer=data.get("shadow_buffer", defaults.shadow_buffer),
            shadow_check=data.get("shadow_check", defaults.shadow_check),
        )

    def parameters(self, model: ModelSpec) -> dict[str, Any]:
        """What makes two results the same (stored in the STAC item)."""
        return {
            "resolution": self.resolution,
            "resampling": self.resampling,
            "bbox": list(self.bbox) if self.bbox is not None else None,
            "aoi": self.aoi,
            "model": model.name,
            "model_version": model.version_label,
            "cloud_buffer": self.cloud_buffer,
            "shadow_buffer": self.shadow_buffer,
            "shadow_check": self.shadow_check,
        }


def _ogc_bbox(value: Any) -> Any:
    """An OGC API bbox input ``{"bbox": [...], "crs": ...}`` unwrapped (CRS84 only); any
    other value as it is (RunOptions checks it)."""
    if not isinstance(value, dict):
        return value
    crs = str(value.get("crs", "CRS84"))
    if not crs.upper().endswith(("CRS84", "4326")):
        raise InvalidInputError("input 'bbox' must be in CRS84 (lon/lat degrees)")
    return value.get("bbox")
