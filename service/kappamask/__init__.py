"""KappaMask: Sentinel-2 cloud masks as an OGC API - Processes service."""

__version__ = "0.1.0"
