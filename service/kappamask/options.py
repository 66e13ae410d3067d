"""What a user may choose about a run: one contract for the CLI and the process.

Every option is declared once, as a field of ``RunOptions`` with its ``Declared``
metadata (title, description, JSON schema, CLI help, how a JSON input or a flag becomes
its value). The process's inputs (``input_schema``) and the CLI's flags
(kappamask.cli_options.run_option_flags) are derived from it, and both build a
``RunOptions`` (``from_inputs``, ``from_flags``), whose checks raise InvalidInputError
naming the input: the same message whichever way a user asked. Downstream code takes
the checked options as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
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
        raise InvalidInputError(
            f"input '{name}' is {len(value)} characters long; at most {MAX_TEXT} are accepted"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInputError(f"input '{name}' holds control characters")
    if has_lone_surrogate(value):
        raise InvalidInputError(f"input '{name}' holds a lone UTF-16 surrogate: not text")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ogc_bbox(value: Any) -> Any:
    """An OGC API bbox input ``{"bbox": [...], "crs": ...}`` unwrapped (CRS84 only); any
    other value as it is (RunOptions checks it)."""
    if not isinstance(value, dict):
        return value
    crs = str(value.get("crs", "CRS84"))
    if not crs.upper().endswith(("CRS84", "4326")):
        raise InvalidInputError("input 'bbox' must be in CRS84 (lon/lat degrees)")
    return value.get("bbox")


def _geojson_file(path: Path) -> dict[str, Any]:
    """The ``--aoi`` file's GeoJSON object (a geometry, Feature or FeatureCollection:
    RunOptions checks it)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"--aoi: {path} is not a GeoJSON file: {err}") from err
    if not isinstance(data, dict):
        raise InvalidInputError(f"--aoi: {path} is not a GeoJSON object")
    return data


@dataclass(frozen=True)
class Declared:
    """How one option is shown and taken: in the process description (``title``,
    ``description``, ``schema``) and on the command line (``help``, ``flag``)."""

    title: str
    description: str
    #: JSON schema of the input, without its default (the field's, or ``input_default``).
    schema: dict[str, Any]
    help: str
    #: The default a JSON client sees where the field's is None (level: "auto").
    input_default: Any = None
    #: A JSON input's value -> the field's value (before RunOptions checks it).
    from_input: Callable[[Any], Any] | None = None
    #: The flag's value -> the field's value.
    from_flag: Callable[[Any], Any] | None = None
    #: How the flag differs from what its schema implies: ``choices`` (instead of the
    #: schema's enum), ``nargs``, ``metavar``, ``type`` (a Python type), ``path`` (an
    #: existing file).
    flag: Mapping[str, Any] = field(default_factory=dict)


def _declared(default: Any, declared: Declared) -> Any:
    return field(default=default, metadata={"declared": declared})


def _buffer_schema() -> dict[str, Any]:
    return {"type": "number", "minimum": 0, "maximum": MAX_BUFFER_M}


@dataclass(frozen=True)
class RunOptions:
    """What a user may choose about a run; constructing one checks it."""

    resolution: int = _declared(
        DEFAULT_RESOLUTION,
        Declared(
            "Output resolution (m)",
            "Ground sampling distance of the mask; every band is resampled to it.",
            {"type": "integer", "enum": list(RESOLUTIONS)},
            "Output resolution in metres.",
            from_flag=int,
        ),
    )
    resampling: str = _declared(
        "lanczos",
        Declared(
            "Resampling",
            "Lanczos (windowed sinc, as in the paper) or bilinear.",
            {"type": "string", "enum": list(RESAMPLING_METHODS)},
            "Resampling of every band to the output grid.",
        ),
    )
    level: str | None = _declared(
        None,
        Declared(
            "Expected processing level",
            "auto (default): read from the product; L1C or L2A: fail unless the product is of "
            "this level.",
            {"type": "string", "enum": [LEVEL_AUTO, *LEVELS]},
            "Fail unless the product is of this level (default: read from the metadata).",
            input_default=LEVEL_AUTO,
            from_input=lambda v: None if v == LEVEL_AUTO else v,
            flag={"choices": LEVELS},
        ),
    )
    #: [west, south, east, north] in degrees, or a GeoJSON (Multi)Polygon in EPSG:4326.
    bbox: tuple[float, float, float, float] | None = _declared(
        None,
        Declared(
            "Bounding box",
            "[west, south, east, north] in degrees (or an OGC bbox object with CRS84): the mask "
            "covers only this part of the product.",
            {
                "oneOf": [
                    {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                    {"type": "object", "required": ["bbox"]},
                ]
            },
            "Mask only this lon/lat box (degrees).",
            from_input=_ogc_bbox,
            from_flag=lambda v: tuple(v) if v else None,
            flag={"type": float, "nargs": 4, "metavar": "W S E N"},
        ),
    )
    aoi: dict[str, Any] | None = _declared(
        None,
        Declared(
            "Area of interest",
            "A GeoJSON Polygon or MultiPolygon (or a Feature of one) in EPSG:4326; pixels "
            "outside it are missing, crops outside it are never computed.",
            {"type": "object", "contentMediaType": "application/geo+json"},
            "Mask only this GeoJSON (Multi)Polygon (a file; EPSG:4326).",
            from_flag=lambda v: _geojson_file(v) if v else None,
            flag={"path": True},
        ),
    )
    #: A model of the repository (``name`` or ``name:version_label``); None: the level's.
    model: str | None = _declared(
        None,
        Declared(
            "Model",
            "A model of the Triton repository, as name or name:version_label (default: "
            "kappamask_l1c or kappamask_l2a by level).",
            {"type": "string", "minLength": 1},
            "Model name[:version_label] (default: by level).",
            from_input=lambda v: text_input({"model": v}, "model", "a model name"),
        ),
    )
    #: Compute again even when the output holds a result for the same parameters.
    overwrite: bool = _declared(
        False,
        Declared(
            "Overwrite",
            "false (default): when the output already holds a result for the same product, "
            "model and parameters, return it without computing again.",
            {"type": "boolean"},
            "Compute again even when the output holds this result.",
        ),
    )

    #: Metres by which clouds (opaque and semi-transparent) and cloud shadows are grown.
    cloud_buffer: float = _declared(
        0.0,
        Declared(
            "Cloud buffer (m)",
            "Grow opaque and semi-transparent clouds by this distance over clear and shadow "
            "pixels (edges of clouds are where masks fail most); never over missing pixels. "
            "Applied to the mask and the usable-pixel mask.",
            _buffer_schema(),
            "Grow clouds (opaque and semi-transparent) by this many metres.",
        ),
    )
    shadow_buffer: float = _declared(
        0.0,
        Declared(
            "Shadow buffer (m)",
            "Grow cloud shadows by this distance over clear pixels.",
            _buffer_schema(),
            "Grow cloud shadows by this many metres.",
        ),
    )
    #: Turn cloud shadow that no cloud of the product could cast into clear
    #: (kappamask.assembly.postprocess.ShadowCheck).
    shadow_check: bool = _declared(
        True,
        Declared(
            "Shadow check",
            "true (default): cloud shadow that no cloud of the product could cast (none up-sun "
            "at a distance a cloud height of 200 m to 12 km explains, from the sun angles of the "
            "metadata) becomes clear: dark forest, water and soil stay clear. false: the "
            "model's shadows as they are.",
            {"type": "boolean"},
            "Make shadow that no cloud of the product could cast (by the sun's angles) clear.",
        ),
    )
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
        values = {}
        for name, declared in declarations():
            if name in data:
                convert = declared.from_input
                values[name] = convert(data[name]) if convert else data[name]
        return cls(**values)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> RunOptions:
        """The options among the CLI's flags (``run_option_flags``)."""
        values = {}
        for name, declared in declarations():
            convert = declared.from_flag
            values[name] = convert(flags[name]) if convert else flags[name]
        return cls(**values)

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


def declarations() -> list[tuple[str, Declared]]:
    """Every option's name and declaration, in the order of the process description."""
    return [
        (f.name, f.metadata["declared"]) for f in fields(RunOptions) if "declared" in f.metadata
    ]


def input_schema() -> dict[str, dict[str, Any]]:
    """The options as inputs of the process description (OGC API - Processes)."""
    defaults = RunOptions()
    inputs = {}
    for name, declared in declarations():
        schema = dict(declared.schema)
        default = (
            getattr(defaults, name) if declared.input_default is None else declared.input_default
        )
        if default is not None:
            schema["default"] = default
        inputs[name] = {
            "title": declared.title,
            "description": declared.description,
            "schema": schema,
            "minOccurs": 0,
            "maxOccurs": 1,
        }
    return inputs
