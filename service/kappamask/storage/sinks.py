"""Sinks for results: files appear at their final names only once the whole result is
complete, the STAC item last; a failed or cancelled run leaves nothing behind.

Writers always write local files (into ``sink.path(name)``); a sink then publishes them:
``LocalSink`` by atomic renames inside the output folder, ``S3Sink`` by multipart uploads
to a temporary prefix and server-side copies to the final keys.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from boto3.s3.transfer import TransferConfig

from kappamask import settings
from kappamask.access import AccessPolicy
from kappamask.errors import (
    AccessDeniedError,
    InvalidInputError,
    KappaMaskError,
    OutputStorageError,
    StorageFullError,
)
from kappamask.storage.s3 import S3Settings, s3_errors, split_s3_url

LOGGER = logging.getLogger(__name__)

STAGING_PREFIX = ".kappamask-staging-"
#: Multipart above 16 MiB, in 16 MiB parts (a 10 m mask COG is 10-60 MB).
TRANSFER = TransferConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20)


def file_name(name: str) -> str:
    """``name`` when it is one plain file name, else AccessDeniedError: what a sink writes
    stays inside its folder or prefix, whatever reached it (the product id is checked
    before, by kappamask.access.product_name; this is the last line)."""
    if (
        not name
        or name in {".", ".."}
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise AccessDeniedError(f"{name[:80]!r} would be written outside the output folder")
    return name


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
        LOGGER.warning(
            "removed %d staging folder(s) of interrupted jobs under %s", len(removed), root
        )
    return removed


#: Free space under which a write that failed without saying why (GDAL's "Write failed")
#: is taken for a full disk.
NEARLY_FULL_BYTES = 64 * 2**20
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_REFUSED = {errno.EROFS, errno.EACCES, errno.EPERM}


def output_error(err: BaseException, folder: Path) -> KappaMaskError | None:
    """The project's error for a failure to write into ``folder`` (None when ``err`` is not
    about it): a full disk 507, a read-only or refused one 503, a name that is a file 400.
    The message names no server path. GDAL's writers fail without an errno ("Write
    failed", libpng's "No IDATs written"): on a nearly full disk, that is the disk."""
    code = err.errno if isinstance(err, OSError) else None
    if code in _FULL:
        return StorageFullError("the output storage is full: no result was written")
    if code in _REFUSED:
        return OutputStorageError(
            f"the output storage cannot be written ({os.strerror(code)}): no result was written"
        )
    if code in {errno.EEXIST, errno.ENOTDIR}:
        return InvalidInputError("output names a file, not a folder")
    if code is None:
        try:
            usage = os.statvfs(folder)
        except OSError:
            return None
        if usage.f_bavail * usage.f_frsize < NEARLY_FULL_BYTES:
            return StorageFullError("the output storage is full: no result was written")
    return None


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
            mapped = output_error(err, self.out_dir) or OutputStorageError(
                f"the output storage cannot be written ({err.strerror})"
            )
            raise mapped from err
        return self

    @property
    def location(self) -> str:
        return str(self.out_dir)

    def path(self, name: str) -> Path:
        """Where to write ``name`` while the result is incomplete."""
        return self.staging / file_name(name)

    def href(self, name: str) -> str:
        """The href of ``name`` in a STAC item that sits next to it."""
        return f"{self.public_url}/{quote(name)}" if self.public_url else f"./{name}"

    def final_href(self, name: str) -> str:
        return f"{self.public_url}/{quote(name)}" if self.public_url else str(self.out_dir / name)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is published."""
        return (self.out_dir / file_name(name)).is_file()

    def read_existing(self, name: str) -> bytes | None:
        """The bytes of a published ``name``, or None."""
        try:
            return (self.out_dir / file_name(name)).read_bytes()
        except OSError:
            return None

    def commit(self, files: Mapping[str, str]) -> dict[str, str]:
        """Move ``files`` (key -> file name) to their final place, in order (put the STAC
        item last); each key's final href."""
        final = {}
        for key, name in files.items():
            os.replace(self.staging / file_name(name), self.out_dir / name)
            final[key] = self.final_href(name)
        return final

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        # a write into the output that failed (a full disk, a file system gone read-only)
        # is the server's storage at fault, whichever writer met it; judged before the
        # staging folder goes (its removal frees the space that ran out)
        mapped = None
        if isinstance(exc, Exception) and not isinstance(exc, KappaMaskError):
            name = exc.filename if isinstance(exc, OSError) else None
            ours = not name or Path(str(name)).is_relative_to(self.out_dir)
            mapped = output_error(exc, self.out_dir) if ours else None
        shutil.rmtree(self.staging, ignore_errors=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only while empty: a committed result stays
            except OSError:
                break
        if mapped is not None and not isinstance(mapped, InvalidInputError):
            raise mapped from exc


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
        if not name.startswith(STAGING_PREFIX):
            file_name(name)
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
        return self._local / file_name(name)

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

    def commit(self, files: Mapping[str, str]) -> dict[str, str]:
        """Upload ``files`` (key -> file name) under the staging prefix, then copy them to
        their final keys in order (put the STAC item last); each key's final href."""
        names = list(files.values())
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
        return {key: self.final_href(name) for key, name in files.items()}

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


@dataclass(frozen=True)
class OutputTarget:
    """Where a run's results go and how their files are named.

    ``location``: a folder or ``s3://bucket/prefix``; ``policy``: what may be written (and,
    for a run, read); ``base``: the service's output folder, which relative folders are
    taken from; ``public_url``: the URL at which ``base`` is served, so that a folder inside
    it is named by URLs under it. A plain folder or URL is the command line's target:
    unrestricted, named by paths.
    """

    location: str | os.PathLike[str]
    policy: AccessPolicy = field(default_factory=AccessPolicy.unrestricted)
    base: Path | None = None
    public_url: str | None = None

    @classmethod
    def of(cls, output: OutputTarget | str | os.PathLike[str]) -> OutputTarget:
        return output if isinstance(output, OutputTarget) else cls(output)

    def at(self, location: str | os.PathLike[str] | None) -> OutputTarget:
        """This target with another location (None: this one)."""
        return self if location is None else replace(self, location=location)

    def open(self) -> Sink:
        """The sink for this location, once ``policy`` allows it."""
        text = str(self.location)
        if text.startswith("s3://"):
            return S3Sink(text, self.policy.s3)
        if "://" in text:
            raise InvalidInputError("output must be a folder or an s3://bucket/prefix URL")
        folder = self.policy.local_output(text, self.base)
        url = None
        base = self.base.resolve() if self.base is not None else None
        if self.public_url and base is not None and folder.resolve().is_relative_to(base):
            relative = folder.resolve().relative_to(base).as_posix()
            url = self.public_url.rstrip("/") + ("/" + quote(relative) if relative != "." else "")
        return LocalSink(folder, url)


def service_target(config: settings.Settings | None = None) -> OutputTarget:
    """The service's output folder as a target: its access policy, named by the URL it is
    published at (``config``: this process's settings by default)."""
    config = config or settings.current()
    folder = config.output_dir.resolve()
    return OutputTarget(folder, AccessPolicy.for_server(config), folder, config.results_url)


def _result_files(result: Any) -> list[str]:
    """The hrefs of the files a finished job published itself: a product's result
    (``RunResult.to_json``) or each product of a batch (``BatchResult.to_json``); none of
    a result that reused another job's files (``reused``), which stay that job's."""
    if not isinstance(result, dict):
        return []
    if isinstance(result.get("products"), list):  # a batch: its products' files
        hrefs = []
        for outcome in result["products"]:
            item = outcome.get("item") if isinstance(outcome, dict) else None
            if not isinstance(item, str) or outcome.get("reused") or "/" not in item:
                continue
            folder, _, name = item.rpartition("/")
            product_id = name.removesuffix("_KAPPAMASK.json")
            hrefs += [f"{folder}/{n}" for n in output_names(product_id).values()]
        return hrefs
    if result.get("reused"):
        return []
    return [v for k, v in result.items() if k in RESULT_FILES and isinstance(v, str)]


#: The files of a product's result by key (STAC asset keys, then the item, which is
#: committed last so that an item is never there before its assets).
RESULT_FILES = ("mask", "confidence", "probability", "valid", "preview", "item")


def output_names(product_id: str) -> dict[str, str]:
    """File names of a result in the output folder, keyed as RESULT_FILES."""
    return {
        "mask": f"{product_id}_KAPPAMASK.tif",
        "confidence": f"{product_id}_KAPPAMASK_CONFIDENCE.tif",
        "probability": f"{product_id}_KAPPAMASK_PROBABILITY.tif",
        "valid": f"{product_id}_KAPPAMASK_VALID.tif",
        "preview": f"{product_id}_KAPPAMASK_PREVIEW.png",
        "item": f"{product_id}_KAPPAMASK.json",
    }


def delete_published(result: Any, service: OutputTarget) -> list[str]:
    """Delete the files a dismissed job published (``_result_files``): local ones only
    inside the output roots, S3 objects with the service's S3 settings. ``service``: the
    service's output folder (``base``) and its URL. The hrefs deleted; what cannot be
    deleted is logged, never raised (the dismissal stands)."""
    deleted = []
    policy = service.policy
    output_dir = service.base or Path(service.location)
    roots = [Path(r).resolve() for r in (policy.output_roots or (output_dir,))]
    served = service.public_url.rstrip("/") + "/" if service.public_url else None
    client = None
    for href in _result_files(result):
        try:
            if href.startswith("s3://"):
                bucket, key = split_s3_url(href)
                client = client or policy.s3.client()
                with s3_errors(href):
                    client.delete_object(Bucket=bucket, Key=key)
            else:
                local = (
                    Path(unquote(href[len(served) :]))
                    if served and href.startswith(served)
                    else Path(href)
                )
                path = (output_dir / local).resolve()
                if not any(path.is_relative_to(root) for root in roots):
                    LOGGER.warning("not deleting %s: outside the output roots", href)
                    continue
                path.unlink(missing_ok=True)
        except Exception as err:  # the dismissal stands; the operator sees what is left
            LOGGER.warning("could not delete %s of a dismissed job: %s", href, err)
            continue
        deleted.append(href)
    return deleted
