"""The Product: everything the pipeline needs to know about one Sentinel-2 tile product."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import rasterio

from kappamask.access import product_name
from kappamask.assembly.shadows import Sun
from kappamask.storage.s3 import S3Settings


@dataclass(frozen=True)
class Product:
    """One Sentinel-2 tile, L1C or L2A, resolved to readable band files.

    ``band_files`` holds, per layer (``B01``.. ``B12``, ``AOT``, ``WVP``, ``SCL``), a
    GDAL-readable path per resolution the product has it at; ``offsets`` the additive
    radiometric offset in digital numbers of each spectral band (empty before
    processing baseline 04.00).
    """

    product_id: str
    level: str
    processing_baseline: str
    sensing_time: datetime
    spacecraft: str
    mgrs_tile: str
    crs: str
    band_files: dict[str, dict[int, str]]
    offsets: dict[str, float] = field(default_factory=dict)
    quantification: float = 10000.0
    #: Data footprint as (lon, lat) pairs in EPSG:4326, closed ring, if the metadata has one.
    footprint: tuple[tuple[float, float], ...] | None = None
    sun_azimuth: float | None = None
    sun_zenith: float | None = None
    #: What the user gave to find the product (path, URL), for derived_from links.
    href: str = ""
    #: GDAL options the band files need (HTTP retries, S3 endpoint).
    gdal_env: dict[str, str] = field(default_factory=dict)
    #: S3 settings (credentials) when band files are read through /vsis3/: never printed.
    s3: S3Settings | None = field(default=None, repr=False)
    #: Per band, the factor from stored DN to DN on the quantification scale (STAC scale
    #: times quantification); 1 when absent.
    gains: dict[str, float] = field(default_factory=dict)

    @property
    def sun(self) -> Sun | None:
        """The sun's mean angles over the tile, where the metadata gives both."""
        if self.sun_azimuth is None or self.sun_zenith is None:
            return None
        return Sun(self.sun_azimuth, self.sun_zenith)

    def __post_init__(self) -> None:
        # the id names the result's files: whatever a SAFE or a STAC item says, it never
        # becomes a path (kappamask.access.product_name)
        product_name(self.product_id)

    def rasterio_env(self, **options: Any) -> rasterio.Env:
        """A ``rasterio.Env`` with ``options`` and what this product's files need."""
        merged = {**options, **self.gdal_env}
        if self.s3 is not None:
            merged.update(self.s3.rasterio_env())
        return rasterio.Env(**merged)

    def has_band(self, band: str) -> bool:
        """Whether the product has ``band`` at any resolution."""
        return bool(self.band_files.get(band))

    def band_path(self, band: str, resolution: int) -> tuple[str, int]:
        """The file of ``band`` to resample to ``resolution`` m, and its own resolution.

        The coarsest file that is still at least as fine as the target: full detail where
        it matters, and no 10 m decode for a 60 m output (ESA's coarser files are the
        same data, already aggregated).
        """
        files = self.band_files[band]
        finer = [r for r in files if r <= resolution]
        res = max(finer) if finer else min(files)
        return files[res], res
