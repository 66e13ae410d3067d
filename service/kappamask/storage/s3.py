"""S3 object storage: settings, boto3 clients, the matching GDAL options, and the one place
where S3 failures become the project's errors (for sources and sinks alike)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from rasterio.session import AWSSession

from kappamask.errors import (
    AccessDeniedError,
    InvalidInputError,
    KappaMaskError,
    ProductNotFoundError,
    StorageError,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Settings:
    """Where S3 lives and how to sign requests. Secrets are kept out of ``repr``."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    requester_pays: bool = False
    #: Unsigned requests (public buckets such as Earth Search's).
    anonymous: bool = False
    #: How published objects are reached over https, e.g.
    #: ``https://{bucket}.s3.eu-central-1.amazonaws.com/{key}``: STAC hrefs of results in
    #: S3 use it; None: ``s3://bucket/key``.
    public_url: str | None = None

    def client(self) -> Any:
        """A boto3 S3 client (path-style addressing on custom endpoints, as MinIO needs)."""
        config = Config(
            signature_version=UNSIGNED if self.anonymous else None,
            s3={"addressing_style": "path"} if self.endpoint_url else None,
            retries={"max_attempts": 5, "mode": "standard"},
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region or "us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            config=config,
        )

    def object_url(self, bucket: str, key: str) -> str:
        """Where a published object is reached: ``public_url`` filled in, or s3://."""
        if self.public_url:
            try:
                return self.public_url.format(bucket=bucket, key=key)
            except (KeyError, IndexError, ValueError) as err:
                raise InvalidInputError(
                    "the S3 public URL template takes only {bucket} and {key}"
                ) from err
        return f"s3://{bucket}/{key}"

    def request_extra(self) -> dict[str, str]:
        """Extra arguments of GetObject/ListObjects for requester-pays buckets."""
        return {"RequestPayer": "requester"} if self.requester_pays else {}

    def gdal_options(self) -> dict[str, str]:
        """GDAL /vsis3/ options other than credentials (rasterio takes those only from a
        session, see ``rasterio_session``)."""
        options: dict[str, str] = {}
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            options["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
            options["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
            options["AWS_VIRTUAL_HOSTING"] = "FALSE"
        return options

    def rasterio_session(self) -> AWSSession:
        """The credentials, region and requester-pays flag for GDAL, as rasterio wants them."""
        if self.anonymous:
            return AWSSession(aws_unsigned=True, region_name=self.region)
        return AWSSession(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            region_name=self.region,
            requester_pays=self.requester_pays,
        )

    def rasterio_env(self) -> dict[str, Any]:
        """Keyword arguments of ``rasterio.Env`` for reading from this storage."""
        return {"session": self.rasterio_session(), **self.gdal_options()}


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise InvalidInputError(f"not an s3://bucket/key URL: {url}")
    if parts.query or parts.fragment:
        raise InvalidInputError(f"s3 URLs take no query or fragment: {url}")
    return parts.netloc, parts.path.lstrip("/")


@contextmanager
def s3_errors(what: str, bucket_request: bool = False) -> Iterator[None]:
    """Turn boto3 failures while doing ``what`` into errors a user can act on.

    ``bucket_request``: a request on the bucket itself (HeadBucket answers a bare 404).
    """
    try:
        yield
    except KappaMaskError:
        raise
    except ClientError as err:
        raise _client_error(err, what, bucket_request) from err
    except S3UploadFailedError as err:  # boto3's transfer wraps the ClientError
        cause = err.__context__
        if isinstance(cause, ClientError):
            raise _client_error(cause, what, bucket_request) from err
        raise StorageError(f"{what}: upload failed") from err
    except NoCredentialsError as err:
        raise AccessDeniedError(
            f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "KAPPAMASK_S3_ANONYMOUS=1 for public buckets)"
        ) from err
    except BotoCoreError as err:
        raise StorageError(f"{what}: {type(err).__name__}: {err}") from err


def _client_error(err: ClientError, what: str, bucket_request: bool) -> KappaMaskError:
    error = err.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket" or (bucket_request and status == 404):
        return ProductNotFoundError(f"{what}: the bucket does not exist")
    if code in {"NoSuchKey", "404", "NotFound"} or status == 404:
        return ProductNotFoundError(f"{what}: no such key")
    if code in {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"} or status == 403:
        return AccessDeniedError(f"{what}: access denied by the storage")
    if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}:
        return AccessDeniedError(f"{what}: the storage refused the credentials ({code})")
    return StorageError(f"{what}: the storage answered {code or status}")


class S3ObjectReader(io.RawIOBase):
    """A seekable read-only file over one S3 object, read with ranged GETs.

    Lets ``zipfile`` list a zipped SAFE product in a bucket without downloading it.
    """

    def __init__(self, client: Any, bucket: str, key: str, extra: Mapping[str, str]) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._extra = client, bucket, key, dict(extra)
        with s3_errors(f"s3://{bucket}/{key}"):
            head = client.head_object(Bucket=bucket, Key=key, **self._extra)
        self.size = int(head["ContentLength"])
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self._pos)
        if want <= 0:
            return 0
        with s3_errors(f"s3://{self._bucket}/{self._key}"):
            body = self._client.get_object(
                Bucket=self._bucket,
                Key=self._key,
                Range=f"bytes={self._pos}-{self._pos + want - 1}",
                **self._extra,
            )["Body"].read()
        n = len(body)
        buffer[:n] = body
        self._pos += n
        return n
