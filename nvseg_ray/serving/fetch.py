"""Fetch the image an HTTP request names, safely.

A request such as ``{"image": "https://host/scan.nii.gz"}`` makes the *server* open a connection to a
place the *client* chose. Without limits that is a server-side request forgery (SSRF) hole: a client could
make the service read cloud metadata (``http://169.254.169.254/...``), internal dashboards or the Ray head.
:func:`fetch_image` therefore applies a :class:`FetchPolicy` before any byte is sent:

* the URI scheme must be allowed (``http``, ``https``, ``s3`` by default; ``file`` / plain local paths only
  when listed explicitly);
* for ``http(s)``, the host must match ``allowed_hosts`` (when set), and **every** address the host name
  resolves to must be public unless ``allow_private_networks`` is set. The check is repeated inside the
  connection itself (a guarded ``httpcore`` network backend connects only to the addresses it has just
  checked), so a DNS answer that changes between the check and the connect ("DNS rebinding") does not
  get through either;
* redirects are followed by hand, at most :data:`MAX_REDIRECTS`, and every hop is checked again (a public
  URL redirecting to a private one is refused);
* the body is streamed and reading stops as soon as it exceeds ``max_bytes`` (a ``Content-Length`` above
  the limit is refused before reading); ``timeout_s`` bounds every network operation *and* the whole
  fetch, redirects included.

Environment proxies (``HTTP_PROXY`` ...) are ignored on purpose: the service connects directly, so the
address checks mean what they say.

Object-store URIs (``s3://``, ``gs://``, ...) and, when allowed, local files go through
:func:`nvseg_ray.io.read_bytes`; their size is checked with ``fs.info`` before anything is read. Their
endpoint and credentials are the operator's (``storage_options`` / AWS environment), so no address check
applies to them; instead they must lie within one of ``allowed_prefixes`` (segment-wise, after
normalisation, see :mod:`nvseg_ray.serving.prefixes`) -- with no prefix listed, no object-store or local
source is accepted at all. A missing object, a forbidden one and a directory are answered alike (422
``image_fetch_failed``, ``reason="unreadable"``), so a client cannot probe which keys exist.

URIs in messages and error details are redacted (:func:`nvseg_ray.redaction.redact_uri`: no user-info, no
signature or token values).

Every failure is a :class:`FetchError` carrying the HTTP status the service should answer with
(``err.http_status``) next to the usual ``code`` / ``message`` / ``hint``.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from ..errors import (  # the fetch family lives in errors.py (re-exported here: they are this module's API)
    REASON_IS_A_DIRECTORY,
    REASON_NOT_FOUND,
    REASON_PERMISSION_DENIED,
    REASON_UNSUPPORTED_SCHEME,
    ConfigError,
    FetchError,
    FetchFailed,
    FetchRefused,
    FetchTimeout,
    LocationNotAllowed,
    PayloadTooLarge,
    StorageError,
)
from ..io import storage_error  # same package: one translation of fsspec/botocore errors
from ..io import read_bytes, split_uri
from ..redaction import redact_uri
from .prefixes import check_location, parse_prefixes

__all__ = [
    "HTTP_SCHEMES",
    "MAX_REDIRECTS",
    "FetchError",
    "FetchFailed",
    "FetchPolicy",
    "FetchRefused",
    "FetchTimeout",
    "PayloadTooLarge",
    "address_problem",
    "check_source",
    "check_url",
    "fetch_image",
    "host_allowed",
    "redact_uri",
]

HTTP_SCHEMES = ("http", "https")
#: Redirect hops followed at most (each one re-checked against the policy).
MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "nvseg-ray-fetch"
#: StorageError reasons answered alike (422, reason "unreadable"): telling them apart would reveal which keys exist.
_UNREADABLE_STORAGE_REASONS = frozenset({REASON_NOT_FOUND, REASON_PERMISSION_DENIED, REASON_IS_A_DIRECTORY})
#: other StorageError reasons that are the client's fault (a wrong URI), answered with 422; others are 502.
_CLIENT_STORAGE_REASONS = frozenset({REASON_UNSUPPORTED_SCHEME})


# --------------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------------


def _as_tuple(value: Sequence[str] | str, field: str) -> tuple[str, ...]:
    """A tuple of strings; a single string is one entry (not its characters)."""
    if isinstance(value, str):
        value = (value,)
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"FetchPolicy.{field} must be a list of strings, got {value!r}.")
    return items


def _normalise_host(host: str) -> str:
    """Lower-case, no trailing dot, no IPv6 brackets."""
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


@dataclass(frozen=True)
class FetchPolicy:
    """What :func:`fetch_image` may fetch.

    Attributes:
        allowed_schemes: URI schemes a request may use (lower-case, without ``://``). ``"file"`` also
            covers plain local paths; list it only for trusted, single-tenant deployments.
        allowed_hosts: ``http(s)`` host names allowed, exact (``"images.example.org"``, ``"10.1.2.3"``) or
            ``"*.suffix"`` wildcards matching any sub-domain (``"*.example.org"`` matches
            ``"a.example.org"`` and ``"a.b.example.org"``, not ``"example.org"`` itself). Empty = any host
            that resolves to public addresses. Being listed does *not* lift the private-address check.
        allow_private_networks: allow hosts that resolve to private, loopback, link-local, reserved,
            multicast or otherwise non-public addresses (e.g. an in-cluster MinIO over http).
        max_bytes: largest image accepted, in bytes.
        timeout_s: limit, in seconds, for every network operation and for the whole fetch.
        allowed_prefixes: URI prefixes object-store and local sources must lie within, compared segment
            by segment (``"s3://scans/ct"``, ``"s3://team-*/in"``, ``"/data/in"``; see
            :mod:`nvseg_ray.serving.prefixes`). Empty = no object-store or local source at all.
    """

    allowed_schemes: tuple[str, ...] = ("http", "https", "s3")
    allowed_hosts: tuple[str, ...] = ()
    allow_private_networks: bool = False
    max_bytes: int = 1 << 30
    timeout_s: float = 60
    allowed_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        schemes = tuple(
            s.strip().lower().removesuffix("://") for s in _as_tuple(self.allowed_schemes, "allowed_schemes")
        )
        hosts = tuple(_normalise_host(h) for h in _as_tuple(self.allowed_hosts, "allowed_hosts"))
        prefixes = tuple(p.uri for p in parse_prefixes(_as_tuple(self.allowed_prefixes, "allowed_prefixes")))
        if int(self.max_bytes) <= 0:
            raise ConfigError(f"FetchPolicy.max_bytes must be positive, got {self.max_bytes}.")
        if not float(self.timeout_s) > 0:
            raise ConfigError(f"FetchPolicy.timeout_s must be positive, got {self.timeout_s}.")
        object.__setattr__(self, "allowed_schemes", tuple(s for s in schemes if s))
        object.__setattr__(self, "allowed_hosts", tuple(h for h in hosts if h))
        object.__setattr__(self, "allowed_prefixes", prefixes)
        object.__setattr__(self, "allow_private_networks", bool(self.allow_private_networks))
        object.__setattr__(self, "max_bytes", int(self.max_bytes))
        object.__setattr__(self, "timeout_s", float(self.timeout_s))


def host_allowed(host: str, patterns: Sequence[str]) -> bool:
    """True when ``host`` matches one of ``patterns`` (exact or ``*.suffix``), or ``patterns`` is empty."""
    if not patterns:
        return True
    name = _normalise_host(host)
    for raw in patterns:
        pattern = _normalise_host(raw)
        if pattern == "*":
            return True
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".example.org"
            if name.endswith(suffix) and len(name) > len(suffix):
                return True
        elif name == pattern:
            return True
    return False


def address_problem(address: str) -> str | None:
    """Why ``address`` (an IPv4/IPv6 literal) is not a public address, or ``None`` when it is public.

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged by their IPv4 address; a zone id
    (``fe80::1%eth0``) is ignored.
    """
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attribute, label in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(ip, attribute):
            return label
    if not ip.is_global:
        return "not publicly routable"
    return None


def _scheme(uri: str) -> str:
    """Lower-case scheme; ``"file"`` for a plain path."""
    return uri.split("://", 1)[0].strip().lower() if "://" in uri else "file"


def _allowed_list(schemes: Sequence[str]) -> str:
    return ", ".join(f"{s}://" for s in schemes) or "none"


# --------------------------------------------------------------------------------------------------------
# Address checks (used before connecting and again inside the connection)
# --------------------------------------------------------------------------------------------------------


def _resolve(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to for TCP, in resolver order, without duplicates."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        unknown = isinstance(exc, UnicodeError) or exc.errno in {
            socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)
        }
        raise FetchFailed(
            f"Cannot resolve the image host {host!r}: {exc}.",
            hint="Check the host name in the image URL." if unknown else "Retry later; the DNS lookup failed.",
            http_status=422 if unknown else 502,
            host=host,
        ) from exc
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _checked_addresses(host: str, port: int, policy: FetchPolicy) -> list[str]:
    """Resolve ``host`` and refuse it when any address is non-public (unless the policy allows it)."""
    addresses = _resolve(host, port)
    if not addresses:
        raise FetchFailed(f"The image host {host!r} resolves to no address.", http_status=422, host=host)
    if policy.allow_private_networks:
        return addresses
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise FetchRefused(
                f"Refusing to fetch from {host!r}: it resolves to {address} ({problem}), and this service "
                "does not fetch from private or internal networks.",
                hint="Use a publicly reachable URL (for object storage: a presigned https URL or an s3:// URI); "
                "the operator can set allow_private_networks for in-cluster sources.",
                host=host,
                reason="private_address",
            )
    return addresses


def check_url(url: str, policy: FetchPolicy) -> tuple[str, int]:
    """Check an ``http(s)`` URL against ``policy`` without connecting; returns ``(host, port)``.

    Raises:
        FetchRefused: scheme or host not allowed, or the host resolves to a non-public address.
        FetchFailed: the URL is malformed or the host does not resolve (422).
    """
    shown = redact_uri(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchFailed(f"Invalid image URL {shown!r}: {exc}.", http_status=422, uri=shown) from exc
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes or scheme not in HTTP_SCHEMES:
        raise FetchRefused(
            f"The URL scheme {scheme + '://'!r} of {shown!r} is not allowed.",
            hint=f"Allowed schemes: {_allowed_list(policy.allowed_schemes)}.",
            uri=shown,
            reason="scheme",
        )
    host = parts.hostname
    if not host:
        raise FetchFailed(f"Invalid image URL {shown!r}: it names no host.", http_status=422, uri=shown)
    if not host_allowed(host, policy.allowed_hosts):
        raise FetchRefused(
            f"The host {host!r} of {shown!r} is not in this service's list of allowed image hosts.",
            hint=f"Allowed hosts: {', '.join(policy.allowed_hosts)}.",
            uri=shown,
            reason="host",
        )
    port = port or (443 if scheme == "https" else 80)
    _checked_addresses(host, port, policy)
    return host, port


class _GuardedBackend(httpcore.SyncBackend):
    """Network backend that checks the addresses again at connect time and connects only to those.

    The TLS server name stays the URL's host (httpcore passes it to ``start_tls`` separately), so
    certificate verification is unchanged.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in _checked_addresses(host, port, self._policy):
            try:
                return super().connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                           socket_options=socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"no address to connect to for {host}")


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for all fetches (building one loads the CA bundle: ~50 ms)."""
    return httpx.create_ssl_context()


def _http_client(policy: FetchPolicy) -> httpx.Client:
    transport = httpx.HTTPTransport(retries=0, verify=_ssl_context())
    pool = getattr(transport, "_pool", None)
    if pool is None or not hasattr(pool, "_network_backend"):  # pragma: no cover - other httpx versions
        raise RuntimeError("unsupported httpx/httpcore version: cannot install the address-checking backend")
    pool._network_backend = _GuardedBackend(policy)
    return httpx.Client(
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(policy.timeout_s),
        headers={"Accept-Encoding": "identity", "User-Agent": _USER_AGENT},
    )


# --------------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------------


def _too_large(shown: str, policy: FetchPolicy, size: int | None) -> PayloadTooLarge:
    what = f"{size} bytes" if size is not None else "more bytes"
    return PayloadTooLarge(
        f"The image {shown!r} has {what} than this service accepts ({policy.max_bytes} bytes).",
        hint="Crop or downsample the volume, store labels/intensities in a smaller dtype, or gzip it (.nii.gz).",
        uri=shown,
        max_bytes=policy.max_bytes,
        size=size,
    )


def _timeout(shown: str, policy: FetchPolicy) -> FetchTimeout:
    return FetchTimeout(
        f"Fetching {shown!r} did not finish within {policy.timeout_s:g} s.",
        hint="Use a faster/closer image host (e.g. object storage in the same region), or a smaller image.",
        uri=shown,
        timeout_s=policy.timeout_s,
    )


def _check_status(response: httpx.Response, shown: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    phrase = f"HTTP {status} {response.reason_phrase}".strip()
    if 400 <= status < 500:
        raise FetchFailed(
            f"The image server answered {phrase} for {shown!r}.",
            hint="Check that the URL is right and readable without credentials (presigned URLs expire).",
            http_status=422,
            uri=shown,
            remote_status=status,
        )
    raise FetchFailed(
        f"The image server answered {phrase} for {shown!r}.",
        hint="The image host failed; retry later." if status >= 500 else None,
        http_status=502,
        uri=shown,
        remote_status=status,
    )


def _read_body(response: httpx.Response, shown: str, policy: FetchPolicy, deadline: float) -> bytes:
    """The body, refusing a declared or streamed size above ``max_bytes`` and enforcing the deadline."""
    declared = response.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            size = None
        if size is not None and size > policy.max_bytes:
            raise _too_large(shown, policy, size)
    body = bytearray()
    for chunk in response.iter_bytes():  # as the data arrives (<= 64 KiB per network read)
        body += chunk
        if len(body) > policy.max_bytes:
            raise _too_large(shown, policy, None)
        if time.monotonic() > deadline:
            raise _timeout(shown, policy)
    return bytes(body)


def _fetch_http(url: str, policy: FetchPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    current = url
    with _http_client(policy) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            shown = redact_uri(current)
            check_url(current, policy)
            if time.monotonic() > deadline:
                raise _timeout(shown, policy)
            try:
                with client.stream("GET", current) as response:
                    if response.status_code in _REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise FetchFailed(
                                f"The image server answered HTTP {response.status_code} without a Location "
                                f"for {shown!r}.",
                                http_status=502,
                                uri=shown,
                            )
                        current = str(response.url.join(location))
                        if _scheme(current) not in HTTP_SCHEMES:
                            raise FetchRefused(
                                f"{shown!r} redirects to a non-HTTP URL ({redact_uri(current)!r}).",
                                hint="Pass the final image URL directly.",
                                uri=shown,
                                reason="redirect",
                            )
                        continue
                    _check_status(response, shown)
                    return _read_body(response, shown, policy, deadline)
            except httpx.TimeoutException as exc:
                raise _timeout(shown, policy) from exc
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise FetchFailed(f"Invalid image URL {shown!r}: {exc}.", http_status=422, uri=shown) from exc
            except httpx.HTTPError as exc:
                raise FetchFailed(
                    f"Cannot fetch {shown!r}: {type(exc).__name__}: {exc or 'connection failed'}.",
                    hint="Check that the image host is up and reachable from the service.",
                    http_status=502,
                    uri=shown,
                ) from exc
    raise FetchFailed(
        f"{redact_uri(url)!r} redirects more than {MAX_REDIRECTS} times.",
        hint="Pass the final image URL directly.",
        http_status=502,
        uri=redact_uri(url),
    )


def _from_storage_error(err: StorageError, shown: str) -> FetchFailed:
    reason = err.details.get("reason")
    if reason in _UNREADABLE_STORAGE_REASONS:  # one answer for all three: no probing for existing keys
        return FetchFailed(
            f"The image {shown!r} cannot be read: it does not exist, is not a file, or this service may not read it.",
            hint="Check the URI; ask the operator whether the service's credentials can read it.",
            http_status=422, uri=shown, reason="unreadable")
    return FetchFailed(err.message, hint=err.hint, http_status=422 if reason in _CLIENT_STORAGE_REASONS else 502,
                       **{**err.details, "uri": shown})


def _fetch_storage(uri: str, policy: FetchPolicy, storage_options: Mapping[str, Any] | None) -> bytes:
    """Read a storage URI that :func:`check_source` has already admitted (and canonicalised)."""
    shown = redact_uri(uri)
    try:
        fs, path = split_uri(uri, storage_options)
        try:
            info = fs.info(path)
        except Exception as exc:
            raise storage_error(exc, shown, "read") from exc
        if info.get("type") == "directory":
            raise storage_error(IsADirectoryError(path), shown, "read")
        size = info.get("size")
        if size is not None and int(size) > policy.max_bytes:
            raise _too_large(shown, policy, int(size))
        data = read_bytes(uri, storage_options)
    except StorageError as err:
        raise _from_storage_error(err, shown) from err
    if len(data) > policy.max_bytes:  # the object grew between info and read
        raise _too_large(shown, policy, len(data))
    return data


def _check_storage(uri: str, policy: FetchPolicy) -> str:
    try:
        return check_location(uri, policy.allowed_prefixes, role="image", setting="allowed_input_prefixes")
    except LocationNotAllowed as err:
        raise FetchRefused(err.message, hint=err.hint, **err.details) from None


def check_source(uri: str, policy: FetchPolicy) -> str:
    """Every check :func:`fetch_image` makes before sending a byte, without fetching; returns the URI to fetch.

    For ``http(s)`` that is ``uri`` itself (scheme, host allow-list, DNS and the private-address check; the
    redirect hops and the connect-time re-check happen while fetching). For object stores and local files it is
    the canonical URI within ``policy.allowed_prefixes`` (see :mod:`nvseg_ray.serving.prefixes`).

    Raises:
        FetchRefused: 403 -- scheme, host or prefix not allowed, a malformed storage URI, a private address.
        FetchFailed: 422 -- empty or malformed URL, a host that does not resolve.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise FetchFailed("The image URI is empty.", hint="Pass an http(s):// or s3:// URI.", http_status=422)
    uri = uri.strip()
    scheme = _scheme(uri)
    if scheme not in policy.allowed_schemes:
        what = "Local paths are" if scheme == "file" else f"The URI scheme {scheme + '://'!r} is"
        raise FetchRefused(
            f"{what} not allowed here ({redact_uri(uri)!r}).",
            hint=f"Allowed schemes: {_allowed_list(policy.allowed_schemes)}.",
            uri=redact_uri(uri),
            reason="scheme",
        )
    if scheme in HTTP_SCHEMES:
        check_url(uri, policy)
        return uri
    return _check_storage(uri, policy)


def fetch_image(uri: str, policy: FetchPolicy, storage_options: dict[str, Any] | None = None) -> bytes:
    """Return the bytes of the image ``uri`` names, if ``policy`` allows it.

    Args:
        uri: ``http(s)://`` URL, object-store URI (``s3://bucket/key``) or, when ``"file"`` is allowed, a
            local path / ``file://`` URI.
        policy: what may be fetched (see :class:`FetchPolicy`).
        storage_options: fsspec options for object-store URIs (s3fs: ``key``, ``secret``, ``endpoint_url``).

    Raises:
        FetchRefused: 403 -- scheme or host not allowed, a storage URI outside ``policy.allowed_prefixes``
            or malformed (``..``, ``%``, ``::`` ...), or a private address (nothing was sent).
        PayloadTooLarge: 413 -- larger than ``policy.max_bytes``.
        FetchFailed: 422 -- bad URL, unknown host, remote 4xx, object missing / forbidden / a directory
            (answered alike, ``reason="unreadable"``);
            502 -- connection errors, remote 5xx, too many redirects, storage back-end failures.
        FetchTimeout: 504 -- slower than ``policy.timeout_s``.
    """
    source = check_source(uri, policy)
    if _scheme(source) in HTTP_SCHEMES:
        return _fetch_http(source, policy)
    return _fetch_storage(source, policy, storage_options)
