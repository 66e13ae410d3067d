"""SAFE products in S3 buckets (a ``.SAFE/`` prefix or a ``.zip`` object), read in place:
metadata with boto3, band files by GDAL through /vsis3/ in windows."""

from __future__ import annotations

import io
import logging
from typing import Any

from kappamask.errors import ProductNotFoundError
from kappamask.sources.product import Product
from kappamask.sources.safe import (
    MAX_METADATA_BYTES,
    SafeFiles,
    capped,
    list_zip,
    product_from_files,
)
from kappamask.storage.s3 import S3ObjectReader, S3Settings, s3_errors, split_s3_url

LOGGER = logging.getLogger(__name__)


def _list_prefix(client: Any, bucket: str, prefix: str, extra: dict[str, str]) -> list[str]:
    names: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **extra):
        names.extend(
            obj["Key"][len(prefix) :] for obj in page.get("Contents", []) if obj["Key"] != prefix
        )
    return names


def open_s3_safe(url: str, settings: S3Settings) -> Product:
    """A Product from ``s3://bucket/path/NAME.SAFE`` (a folder) or ``.../NAME.zip``."""
    bucket, key = split_s3_url(url)
    client = settings.client()
    extra = settings.request_extra()
    name = key.rstrip("/").rsplit("/", 1)[-1] or bucket
    with s3_errors(url):
        if key.lower().endswith(".zip"):
            # Buffered: zipfile's many small reads become few ranged GETs.
            reader = io.BufferedReader(S3ObjectReader(client, bucket, key, extra), 2**20)
            files: SafeFiles = list_zip(reader, name, f"/vsis3/{bucket}/{key}")
            folder = False
        else:
            if key.lower().endswith(".xml"):
                key = key.rsplit("/", 1)[0]
            prefix = key.rstrip("/") + "/" if key else ""
            names = _list_prefix(client, bucket, prefix, extra)
            if not names:
                raise ProductNotFoundError(f"{url}: no such key or prefix in the bucket")

            def read(member: str) -> bytes:
                with s3_errors(f"s3://{bucket}/{prefix}{member}"):
                    body = client.get_object(Bucket=bucket, Key=prefix + member, **extra)["Body"]
                    return capped(bytes(body.read(MAX_METADATA_BYTES + 1)), member)

            files = SafeFiles(names, read, f"/vsis3/{bucket}/{prefix.rstrip('/')}")
            folder = True
        product = product_from_files(files, name, folder=folder, href=url, s3=settings)
    LOGGER.info("reading %s in place from s3://%s", product.product_id, bucket)
    return product
