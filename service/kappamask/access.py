"""What a run may touch: local folders inside configured roots, URLs to configured hosts
(never file://, loopback or private addresses unless configured), S3 with the configured
settings. The CLI runs unrestricted (the data's owner runs it); the service does not."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from kappamask import settings
from kappamask.errors import AccessDeniedError, InvalidInputError, ProductNotFoundError
from kappamask.storage.s3 import S3Settings

LOGGER = logging.getLogger(__name__)

#: Longest file or folder name Linux file systems take (bytes).
NAME_MAX = 255
#: Longest product id that names files: the longest result file adds 29 characters
#: (``_KAPPAMASK_CONFIDENCE.tif``, ``_KAPPAMASK_PROBABILITY.tif``) and must stay a name
#: the file system takes; ESA's product names are 60 characters.
MAX_PRODUCT_ID = 200
#: A product id that may name files: ESA's product names (``S2A_MSIL2A_..._T29UNU_...``),
#: Earth Search's and Planetary Computer's item ids, all of them ASCII letters, digits,
#: ``_``, ``-`` and ``.``; never a path (no ``/``, no leading ``.`` or ``-``).
_PRODUCT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def product_name(product_id: str) -> str:
    """``product_id`` when it may name the files of a result, else InvalidInputError.

    The one check of every name that reaches a path (a SAFE's PRODUCT_URI, a STAC item's
    ``id``, ``s2:product_uri`` or ``sentinel:product_id``): an absolute or relative path,
    ``..``, a NUL, a non-ASCII or over-long name is refused, never rewritten, so that two
    products cannot end up with the same files.
    """
    return safe_name(product_id, "input 'product': the product id", "a Sentinel-2 product name")


def safe_name(name: str, what: str, kind: str = "a name", longest: int = MAX_PRODUCT_ID) -> str:
    """``name`` when it is a plain ASCII name that can be a file name or a URL path segment
    (``product_name``; a batch's collection id), else InvalidInputError."""
    shown = repr(name[:80]) + ("..." if len(name) > 80 else "")
    if len(name) > longest:
        raise InvalidInputError(
            f"{what} is {len(name)} characters long; at most {longest} can name files"
        )
    if not _PRODUCT_ID.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"{what} {shown} is not {kind} (ASCII letters, digits, '_', '-' and '.', "
            "starting with a letter or digit, no '..'), so it cannot name files"
        )
    return name


def check_local_path(
    href: str, roots: Sequence[Path] | None, what: str = "product path", shown: str | None = None
) -> Path:
    """Resolve ``href`` (symlinks included) and refuse it unless it lies in one of ``roots``;
    a FIFO, device or socket is refused whatever the roots.

    ``roots=None`` means no restriction (the command line, run by the data's owner).
    ``shown``: how messages name the path (what the client gave, never a server folder).
    """
    if not href or any(ord(c) < 32 for c in href):
        raise InvalidInputError(f"{what} is empty or holds control characters")
    if has_lone_surrogate(href):
        raise InvalidInputError(f"{what} is not valid text (a lone UTF-16 surrogate?)")
    if href.startswith("file:"):
        raise InvalidInputError("file:// URLs are not accepted: give a plain path")
    path = Path(href).expanduser()
    if any(len(part.encode()) > NAME_MAX for part in path.parts):
        raise InvalidInputError(f"{what} has a name longer than {NAME_MAX} bytes")
    try:
        resolved = path.resolve()
    except OSError as err:  # a name the file system refuses; a symlink loop (3.13)
        raise InvalidInputError(f"{what} cannot be resolved: {err.strerror}") from err
    except RuntimeError as err:  # a symlink loop (Python 3.11, 3.12)
        raise InvalidInputError(f"{what} cannot be resolved: a symbolic link loop") from err
    _refuse_special(resolved, what)
    if roots is None:
        return resolved
    for root in roots:
        root_resolved = Path(root).expanduser().resolve()
        if resolved == root_resolved or root_resolved in resolved.parents:
            return resolved
    kind = "output roots" if what == "output folder" else "data roots"
    raise AccessDeniedError(f"{shown or href} is outside the {kind} this server allows")


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a UTF-16 surrogate of its own (JSON's ``"\\ud800"``): no
    text, and no file system, URL or log line takes it."""
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _refuse_special(path: Path, what: str) -> None:
    """Refuse a FIFO, device or socket before anything opens it: reading one blocks
    forever (a FIFO nobody writes) or never ends (``/dev/zero``)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # absent: the caller says "does not exist" in its own words
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidInputError(
            f"{what} is not a regular file or folder (a FIFO, device or "
            "socket), which this service never reads"
        )


#: Public STAC APIs and their asset hosts, allowed when the server config names none.
DEFAULT_ALLOWED_HOSTS = (
    "earth-search.aws.element84.com",
    "*.amazonaws.com",
    "planetarycomputer.microsoft.com",
    "*.blob.core.windows.net",
    "catalogue.dataspace.copernicus.eu",
    "stac.dataspace.copernicus.eu",
    "*.dataspace.copernicus.eu",
)


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    """Whether ``host`` is one of ``patterns`` (``*.example.com`` matches subdomains)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


@dataclass(frozen=True)
class AccessPolicy:
    """Where inputs may come from and results may go."""

    #: Local folders products may be read from; None: anywhere.
    data_roots: tuple[Path, ...] | None = None
    #: Local folders results may be written to; None: anywhere.
    output_roots: tuple[Path, ...] | None = None
    #: Host names http(s) URLs may point to; None: any host.
    allowed_hosts: tuple[str, ...] | None = None
    #: Whether URLs may resolve to loopback, private or link-local addresses.
    allow_private_networks: bool = True
    s3: S3Settings = field(default_factory=S3Settings)

    @classmethod
    def unrestricted(cls, s3: S3Settings | None = None) -> AccessPolicy:
        """The command line's policy: the user's own files and network."""
        return cls(s3=s3 or settings.current().s3())

    @classmethod
    def for_server(cls, config: settings.Settings) -> AccessPolicy:
        """The service's policy: its data roots (the current folder where none are set),
        its output folder, the allowed hosts (public STAC APIs where none are set)."""
        return cls(
            data_roots=config.roots,
            output_roots=(config.output_dir.resolve(),),
            allowed_hosts=config.allowed_hosts or DEFAULT_ALLOWED_HOSTS,
            allow_private_networks=config.allow_private_networks,
            s3=config.s3(),
        )

    def local_input(self, href: str) -> Path:
        """A local product path, checked against the data roots."""
        return check_local_path(href, self.data_roots)

    def local_output(self, href: str, base: Path | None = None) -> Path:
        """A local output folder (relative to ``base``), checked against the output roots."""
        path = Path(href).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        folder = check_local_path(str(path), self.output_roots, "output folder", shown=href)
        for root in self.output_roots or ():
            resolved_root = Path(root).resolve()
            if folder.is_relative_to(resolved_root):
                hidden = [p for p in folder.relative_to(resolved_root).parts if p.startswith(".")]
                if hidden:
                    # the job database (.jobs) and running jobs' staging folders live there,
                    # and /outputs never serves them
                    raise AccessDeniedError(
                        f"output folder {href} names a hidden folder "
                        f"({hidden[0]}), which holds the service's own "
                        "state"
                    )
        return folder

    def url(self, url: str) -> str:
        """Refuse anything but http(s) URLs to allowed hosts on public addresses."""
        self.addresses(url)
        return url

    def addresses(self, url: str) -> list[str]:
        """The addresses ``url``'s host may be reached at (``url``'s checks); the host
        name itself when private networks are allowed (nothing is resolved then)."""
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"}:
            raise InvalidInputError(f"only http(s) and s3 URLs are accepted, not {parts.scheme}://")
        try:
            host = parts.hostname
            port = parts.port
        except ValueError as err:  # a port that is no number, or out of range
            raise InvalidInputError(f"malformed URL: {err}") from err
        if not host:
            raise InvalidInputError(f"URL without a host: {url[:200]}")
        if parts.username or parts.password:
            raise InvalidInputError("URLs with credentials in them are not accepted")
        if self.allowed_hosts is not None and not host_matches(host, self.allowed_hosts):
            raise AccessDeniedError(f"host {host} is not among the hosts this server may contact")
        if self.allow_private_networks:
            return [host]
        try:
            infos = socket.getaddrinfo(host, port or None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as err:
            raise ProductNotFoundError(f"host {host} does not resolve") from err
        found = [str(info[4][0]) for info in infos]
        if not found or not all(_is_public(address) for address in found):
            raise AccessDeniedError(
                f"host {host} is a loopback or private address, which this server may not contact"
            )
        return found
