"""The access policy on every connection GDAL opens, redirects included.

GDAL (libcurl) follows HTTP redirects by itself and offers no setting to stop it, so a
band href on an allowed host that answers ``302 Location: http://169.254.169.254/...``
would be fetched. In the service, GDAL therefore reaches the network only through this
forward proxy (``GDAL_HTTP_PROXY``, set once for the whole process: GDAL's configuration
is process-wide, and a per-read setting would be undone under a concurrent read when its
``rasterio.Env`` closes). Each request, each redirect hop and each ``CONNECT`` of an
https URL is checked against the policy of product URLs (``AccessPolicy.addresses``:
allowed hosts, no loopback or private address unless allowed) and connected to the very
address that was checked, so a name cannot resolve elsewhere between the check and the
connection. The S3 endpoint of the service's own settings is trusted: the operator
configured it. A refusal is answered ``403`` and remembered, so that the reader can say
which host was refused instead of GDAL's bare "HTTP 403".

The command line (``AccessPolicy.unrestricted``) installs nothing: the data's owner runs it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

# rasterio's public API sets and reads GDAL options; unsetting one is in its _env module
from rasterio._env import del_gdal_config
from rasterio.env import get_gdal_config, set_gdal_config

from kappamask.access import AccessPolicy, host_matches
from kappamask.errors import AccessDeniedError, KappaMaskError

LOGGER = logging.getLogger(__name__)

#: The GDAL option (process-wide configuration) that routes its HTTP through here.
PROXY_OPTION = "GDAL_HTTP_PROXY"
#: Seconds a connection may stay silent (request head, upstream connect, relay).
IDLE_TIMEOUT_S = 60.0
#: Largest request head (request line and headers) accepted.
MAX_HEAD_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Refusal:
    """A connection the proxy refused: when, to which host, why."""

    at: float
    host: str
    reason: str


class _Handler(socketserver.BaseRequestHandler):
    server: _Server
    request: socket.socket

    def handle(self) -> None:
        self.connection = self.request
        self.connection.settimeout(IDLE_TIMEOUT_S)
        self.leftover = b""
        try:
            head = self._read_head()
        except (OSError, ValueError):
            return
        if not head:
            return
        request_line, _, rest = head.partition(b"\r\n")
        try:
            method, target, version = request_line.decode("latin-1").split(" ", 2)
        except ValueError:
            self._refuse("?", "malformed request", 400)
            return
        if method.upper() == "CONNECT":
            host, _, port_text = target.rpartition(":")
            url = f"https://{host}:{port_text}/"
        else:
            url = target
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
        except ValueError:
            port = 0
        if parts.scheme not in _DEFAULT_PORTS or not host or not port:
            self._refuse(host or "?", f"not an http(s) URL: {url[:100]}", 400)
            return
        try:
            address = self.server.egress.address(url, host, port)
        except KappaMaskError as err:
            self._refuse(host, str(err), 403)
            return
        try:
            upstream = socket.create_connection(address, timeout=IDLE_TIMEOUT_S)
        except OSError as err:
            self._refuse(host, f"cannot connect: {err.strerror or err}", 502)
            return
        with upstream:
            if method.upper() == "CONNECT":
                self.connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                # one request per connection: the next one (a redirect hop, another host)
                # comes on a new connection and is checked again
                path = parts.path or "/"
                if parts.query:
                    path += "?" + parts.query
                headers = [
                    line
                    for line in rest.split(b"\r\n")
                    if line
                    and not line.lower().startswith((b"proxy-", b"connection:", b"keep-alive:"))
                ]
                upstream.sendall(
                    f"{method} {path} {version}\r\n".encode("latin-1")
                    + b"".join(h + b"\r\n" for h in headers)
                    + b"Connection: close\r\n\r\n"
                )
            self._relay(upstream)

    def _read_head(self) -> bytes:
        """The request line and headers; what came after them is kept in ``leftover``."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.connection.recv(65536)
            if not chunk:
                return b""
            data += chunk
            if len(data) > MAX_HEAD_BYTES:
                raise ValueError("request head too large")
        head, _, self.leftover = data.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def _relay(self, upstream: socket.socket) -> None:
        """Bytes both ways until one side closes or both are silent too long; what the
        client sent past its request head first."""
        if self.leftover:
            upstream.sendall(self.leftover)
        client = self.connection
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while True:
                events = selector.select(IDLE_TIMEOUT_S)
                if not events:
                    return
                for key, _ in events:
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    data = source.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()

    def _refuse(self, host: str, reason: str, status: int) -> None:
        if status == 403:  # the policy's refusal; a host that is down is the storage's fault
            self.server.egress.record(host, reason)
        body = reason.encode("utf-8", "replace")
        phrase = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}[status]
        with contextlib.suppress(OSError):  # the client has gone
            self.connection.sendall(
                f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    egress: Egress


class Egress:
    """The proxy of this process and the policies it enforces (one in practice: the
    service's; a connection passes only when every one of them allows it)."""

    def __init__(self) -> None:
        self._policies: list[AccessPolicy] = []
        self._refusals: collections.deque[Refusal] = collections.deque(maxlen=256)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.egress = self
        self.address_text = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(
            target=self._server.serve_forever, name="kappamask-egress", daemon=True
        ).start()

    def add(self, policy: AccessPolicy) -> None:
        with self._lock:
            if policy not in self._policies:
                self._policies.append(policy)

    def address(self, url: str, host: str, port: int) -> tuple[str, int]:
        """The checked address to connect to for ``url``: every policy of the process must
        allow it (fail closed where two processes are configured differently)."""
        with self._lock:
            policies = list(self._policies)
        if not policies:
            raise AccessDeniedError("no access policy is installed")
        address = host
        for policy in policies:
            if not _trusted(policy, host):
                address = policy.addresses(url)[0]
        return address, port

    def reset(self) -> None:
        """Forget the policies (tests that install several in one process)."""
        with self._lock:
            self._policies.clear()
            self._refusals.clear()

    def record(self, host: str, reason: str) -> None:
        LOGGER.warning("refused a connection of GDAL to %s: %s", host, reason)
        self._refusals.append(Refusal(time.monotonic(), host, reason))

    def refusals_since(self, since: float) -> list[Refusal]:
        return [r for r in list(self._refusals) if r.at >= since]


def _trusted(policy: AccessPolicy, host: str) -> bool:
    """The S3 endpoint the operator configured (its virtual-hosted buckets too), or AWS's
    own S3 hosts when none is configured (GDAL's /vsis3/ default)."""
    endpoint = urlsplit(policy.s3.endpoint_url or "").hostname
    patterns = [endpoint, f"*.{endpoint}"] if endpoint else ["*.amazonaws.com"]
    return host_matches(host, patterns)


_EGRESS: Egress | None = None
_EGRESS_LOCK = threading.Lock()


def install(policy: AccessPolicy) -> Egress | None:
    """Route all of this process's GDAL HTTP through the proxy enforcing ``policy``
    (started on first use); nothing for an unrestricted policy."""
    global _EGRESS
    if policy.allowed_hosts is None and policy.allow_private_networks:
        return None
    with _EGRESS_LOCK:
        if _EGRESS is None:
            _EGRESS = Egress()
        if get_gdal_config(PROXY_OPTION, normalize=False) != _EGRESS.address_text:
            # process-wide (GDAL's global configuration, which every thread's reads consult
            # after their own), never undone while policies are installed (see the module
            # docstring)
            set_gdal_config(PROXY_OPTION, _EGRESS.address_text)
            LOGGER.info(
                "GDAL reaches the network through the policy proxy %s", _EGRESS.address_text
            )
        _EGRESS.add(policy)
        return _EGRESS


def refusals_since(since: float) -> list[Refusal]:
    """The connections the proxy refused since ``since`` (time.monotonic())."""
    return _EGRESS.refusals_since(since) if _EGRESS is not None else []


def reset() -> None:
    """Forget the installed policies and route GDAL directly again; the proxy stays up
    for the next ``install`` (tests, which try several policies in one process)."""
    if _EGRESS is not None:
        _EGRESS.reset()
        if get_gdal_config(PROXY_OPTION, normalize=False) == _EGRESS.address_text:
            del_gdal_config(PROXY_OPTION)
