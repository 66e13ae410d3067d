"""Sinks for results: files appear at their final names only once the whole result is
complete, the STAC item last; a failed or cancelled run leaves nothing behind.

Writers always write local files (into ``sink.path(name)``); a sink then publishes them:
``LocalSink`` by atomic renames inside the output folder, ``S3Sink`` by multipart uploads
to a temporary prefix and server-side copies to the final keys.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from boto3.s3.transfer import TransferConfig

from kappamask.access import AccessPolicy
from kappamask.errors import InvalidInputError
from kappamask.s3 import S3Settings, s3_errors, split_s3_url

LOGGER = logging.getLogger(__name__)

STAGING_PREFIX = ".kappamask-staging-"
#: Multipart above 16 MiB, in 16 MiB parts (a 10 m mask COG is 10-60 MB).
TRANSFER = TransferConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20)


def staging_name() -> str:
    """A staging folder's name: prefix, owner process and host, then a random part, so
    that a restarted service can tell the folders of dead processes from live ones."""
    return f"{STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex}"


def _owner_alive(name: str) -> bool:
    """Whether the process that made staging folder ``name`` may still be writing it."""
    owner = name[len(STAGING_PREFIX) :].rpartition(".")[0]
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's (shared volume) or unknown: not ours to judge
    if int(pid) == os.getpid():
        return False  # called at start-up: this process has not staged anything yet
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(root: Path) -> list[Path]:
    """Remove the staging folders under ``root`` whose process on this host is gone (a
    service killed mid-job leaves them); the folders removed."""
    removed = []
    for folder, dirs, _files in os.walk(root):
        for name in [d for d in dirs if d.startswith(STAGING_PREFIX)]:
            dirs.remove(name)  # never walk into a staging folder
            if not _owner_alive(name):
                shutil.rmtree(Path(folder) / name, ignore_errors=True)
                removed.append(Path(folder) / name)
    if removed:
        LOGGER.warning("removed %d staging folder(s) of interrupted jobs under %s",
                       len(removed), root)  # fmt: skip
    return removed


class LocalSink:
    """Stage files in a hidden folder inside ``out_dir`` (same file system, so the final
    move is an atomic rename) and move them in on ``commit``. A run that fails or is
    cancelled leaves nothing: the staging folder goes, and so do the folders it created
    to hold the result, when they stayed empty.

    ``public_url``: where the service serves ``out_dir`` over HTTP; results then name their
    files by absolute URLs a client elsewhere can open (as S3 results do), else by paths
    and, inside the STAC item, by hrefs relative to it."""

    def __init__(self, out_dir: Path, public_url: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.absolute_hrefs = self.public_url is not None
        self.staging = self.out_dir / staging_name()
        self._created: list[Path] = []  # folders this sink made, deepest last

    def __enter__(self) -> LocalSink:
        missing = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        self._created = missing[::-1]
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()
        except OSError as err:
            raise InvalidInputError(
                f"cannot write results to {self.out_dir}: {err.strerror}"
            ) from err
        return self

    @property
    def location(self) -> str:
        return str(self.out_dir)

    def path(self, name: str) -> Path:
        """Where to write ``name`` while the result is incomplete."""
        return self.staging / name

    def href(self, name: str) -> str:
        """The href of ``name`` in a STAC item that sits next to it."""
        return f"{self.public_url}/{quote(name)}" if self.public_url else f"./{name}"

    def final_href(self, name: str) -> str:
        return f"{self.public_url}/{quote(name)}" if self.public_url else str(self.out_dir / name)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is published."""
        return (self.out_dir / name).is_file()

    def read_existing(self, name: str) -> bytes | None:
        """The bytes of a published ``name``, or None."""
        try:
            return (self.out_dir / name).read_bytes()
        except OSError:
            return None

    def commit(self, names: Sequence[str]) -> list[str]:
        """Move ``names`` to their final place, in order (put the STAC item last)."""
        final = []
        for name in names:
            os.replace(self.staging / name, self.out_dir / name)
            final.append(self.final_href(name))
        return final

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only while empty: a committed result stays
            except OSError:
                break


class S3Sink:
    """Publish to ``s3://bucket/prefix``: upload to ``prefix/.kappamask-staging-*/``, then
    copy to the final keys (STAC item last) and delete the staging keys. On any failure
    the staging keys and the final keys this commit already wrote are removed."""

    absolute_hrefs = True

    def __init__(self, url: str, settings: S3Settings) -> None:
        self.bucket, prefix = split_s3_url(url.rstrip("/") + "/")
        self.prefix = prefix.strip("/")
        self.settings = settings
        self.staging_prefix = self._key(staging_name()) + "/"
        self._client: Any = None
        self._local = Path(tempfile.mkdtemp(prefix="kappamask-"))
        self._staged: list[str] = []

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __enter__(self) -> S3Sink:
        self._client = self.settings.client()
        try:
            with s3_errors(f"output s3://{self.bucket}", bucket_request=True):
                self._client.head_bucket(Bucket=self.bucket)
        except BaseException:
            shutil.rmtree(self._local, ignore_errors=True)
            raise
        return self

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def path(self, name: str) -> Path:
        return self._local / name

    def href(self, name: str) -> str:
        """Absolute: s3://, or https when the settings give a public URL template."""
        return self.settings.object_url(self.bucket, self._key(name))

    def final_href(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def exists(self, name: str) -> bool:
        """Whether ``name`` is published (a HEAD request; no download)."""
        try:
            with s3_errors(self.final_href(name)):
                self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception:  # absent or unreadable: compute it again
            return False
        return True

    def read_existing(self, name: str) -> bytes | None:
        try:
            with s3_errors(self.final_href(name)):
                body = self._client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
                return bytes(body.read())
        except Exception:  # absent or unreadable: compute it again
            return None

    def commit(self, names: Sequence[str]) -> list[str]:
        for name in names:
            key = self.staging_prefix + name
            with s3_errors(f"uploading {name} to s3://{self.bucket}"):
                self._client.upload_file(str(self._local / name), self.bucket, key, Config=TRANSFER)
            self._staged.append(key)
        written: list[str] = []
        try:
            for name in names:
                with s3_errors(f"publishing {self.final_href(name)}"):
                    self._client.copy(
                        {"Bucket": self.bucket, "Key": self.staging_prefix + name},
                        self.bucket,
                        self._key(name),
                        Config=TRANSFER,
                    )
                written.append(self._key(name))
        except BaseException:
            self._delete(written)
            raise
        return [self.final_href(name) for name in names]

    def _delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as err:  # cleanup must not hide the original error
                LOGGER.warning("could not delete s3://%s/%s: %s", self.bucket, key, err)

    def __exit__(self, *exc_info: object) -> None:
        if self._client is not None:
            self._delete(self._staged)
        shutil.rmtree(self._local, ignore_errors=True)


Sink = LocalSink | S3Sink


def open_sink(
    output: str | os.PathLike[str],
    policy: AccessPolicy,
    base: Path | None,
    public_url: str | None = None,
) -> Sink:
    """The sink for an output folder or ``s3://bucket/prefix`` allowed by ``policy``.

    ``public_url``: the URL at which ``base`` is served; a folder inside ``base`` is named
    by URLs under it."""
    text = str(output)
    if text.startswith("s3://"):
        return S3Sink(text, policy.s3)
    if "://" in text:
        raise InvalidInputError("output must be a folder or an s3://bucket/prefix URL")
    folder = policy.local_output(text, base)
    url = None
    if public_url and base is not None and folder.resolve().is_relative_to(base.resolve()):
        relative = folder.resolve().relative_to(base.resolve()).as_posix()
        url = public_url.rstrip("/") + ("/" + quote(relative) if relative != "." else "")
    return LocalSink(folder, url)
