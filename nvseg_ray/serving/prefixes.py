"""Where a client may make the service read or write: URI prefix allow-lists, compared segment by segment.

Requests name storage locations (``"image": "s3://bucket/ct/a.nii.gz"``, ``"output_uri": ...``); the
service's credentials usually reach far more than any one client should. The operator therefore lists URI
prefixes (``allowed_input_prefixes``, ``allowed_output_prefixes`` in the serve config) and
:func:`check_location` admits a URI only when, after normalisation, it lies *inside* one of them:

* the scheme must match (``s3a://`` counts as ``s3://``, ``gcs://`` as ``gs://``; a plain absolute path
  is ``file``), the bucket must match exactly (or a ``*`` glob in the prefix's bucket, e.g.
  ``s3://team-a-*/masks``), and the prefix's path segments must be the first path segments of the URI:
  ``s3://masks`` admits ``s3://masks/x`` but not ``s3://masks-evil/x``; ``s3://masks/a`` admits
  ``s3://masks/a/b`` but not ``s3://masks/ab``;
* anything whose meaning differs between storage back-ends, or that could leave the prefix, is refused
  outright rather than interpreted: ``.`` / ``..`` segments, percent-escapes (``%2e%2e``), backslashes,
  fsspec chains (``simplecache::s3://...``, anything with ``::``), user-info (``s3://KEY:SECRET@b/...``),
  query strings and fragments, control characters, relative local paths, ``file://`` URIs with a host;
* repeated slashes collapse (``s3://b//x`` is ``s3://b/x``), a trailing slash is dropped;
* local paths (only when the operator lists a local prefix) are resolved with :func:`os.path.realpath`,
  so a symlink inside the prefix that points outside it is refused. The prefix itself is resolved too.

:func:`check_location` returns the *canonical* URI, which is what the service then reads or writes, so the
string that was checked is the string that is used.

Operator prefixes are validated by :func:`parse_prefix`: each must name a bucket (object stores) or an
absolute directory other than ``/`` -- there is no "anywhere" prefix.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, LocationNotAllowed
from ..redaction import redact_uri

__all__ = [
    "Location",
    "LocationNotAllowed",
    "canonical_location",
    "check_location",
    "check_output_uri",
    "is_within",
    "parse_prefix",
    "parse_prefixes",
]

#: scheme aliases: fsspec registers these names for the same filesystem.
SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}
_SCHEME = re.compile(r"^[a-z][a-z0-9+.\-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Location:
    """A normalised storage location.

    Attributes:
        scheme: lower-case canonical scheme (``"s3"``, ``"gs"``, ``"az"``, ``"file"`` for local paths).
        bucket: bucket / container name (lower-case); ``""`` for local paths. In a prefix it may hold ``*``.
        parts: path segments below the bucket (local: below ``/``), none empty, none ``.`` or ``..``.
    """

    scheme: str
    bucket: str
    parts: tuple[str, ...]

    @property
    def uri(self) -> str:
        """``s3://bucket/a/b`` or, for local paths, ``/a/b``."""
        path = "/".join(self.parts)
        if self.scheme == "file":
            return "/" + path
        return f"{self.scheme}://{self.bucket}/{path}" if path else f"{self.scheme}://{self.bucket}"


def _shown(uri: str) -> str:
    """``uri`` for messages: redacted when it could carry a secret (user-info, query), else verbatim."""
    return redact_uri(uri) if ("@" in uri or "?" in uri) else uri


def _refuse(uri: str, why: str, role: str, **details: Any) -> LocationNotAllowed:
    return LocationNotAllowed(
        f"The {role} {_shown(uri)!r} is not accepted: {why}.",
        hint="Name the object plainly, e.g. s3://bucket/dir/name.nii.gz (no '..', '%', '\\', '::', '?', '@').",
        uri=_shown(uri),
        reason="malformed",
        **details,
    )


def _segments(path: str, uri: str, role: str) -> tuple[str, ...]:
    parts = tuple(p for p in path.split("/") if p)
    if any(p in (".", "..") for p in parts):
        raise _refuse(uri, "it has a '.' or '..' path segment", role)
    return parts


def canonical_location(uri: str, *, role: str = "URI", resolve_local: bool = True) -> Location:
    """Parse and normalise a storage URI or absolute local path (see the module docstring for the rules).

    Args:
        uri: ``s3://bucket/key``, ``gs://...``, ``file:///abs/path`` or ``/abs/path``.
        role: what the URI is, for messages (``"output_uri"``, ``"image"``).
        resolve_local: resolve symlinks of local paths (``os.path.realpath``).

    Raises:
        LocationNotAllowed: the URI is malformed or ambiguous (403, ``reason="malformed"``).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise _refuse(str(uri), "it is empty", role)
    text = uri.strip()
    if _CONTROL.search(text):
        raise _refuse(text, "it contains control characters", role)
    if "::" in text:
        raise _refuse(text, "fsspec URL chains ('::') are not accepted", role)
    if "\\" in text:
        raise _refuse(text, "it contains a backslash", role)
    if "%" in text:
        raise _refuse(text, "percent-escapes are not accepted", role)
    if "?" in text or "#" in text:
        raise _refuse(text, "query strings and fragments are not accepted", role)
    if "://" not in text:
        scheme, rest = "file", text
        if not rest.startswith("/"):
            raise _refuse(text, "local paths must be absolute", role)
    else:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if not _SCHEME.match(scheme):
            raise _refuse(text, f"{scheme!r} is not a URI scheme", role)
        scheme = SCHEME_ALIASES.get(scheme, scheme)
        if scheme == "file":
            host, _, path = rest.partition("/")
            if host not in ("", "localhost"):
                raise _refuse(text, "file:// URIs with a host name are not accepted", role)
            rest = "/" + path
    if scheme == "file":
        _segments(rest, text, role)  # '..' is refused as written, before symlinks are resolved
        if resolve_local:
            rest = os.path.realpath(rest)
        return Location("file", "", _segments(rest, text, role))
    bucket, _, path = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise _refuse(text, "user-info or ports in the bucket name are not accepted", role)
    if not bucket:
        raise _refuse(text, "it names no bucket", role)
    return Location(scheme, bucket.lower(), _segments(path, text, role))


def parse_prefix(prefix: str) -> Location:
    """An operator's allowed prefix, normalised (a local prefix is resolved like the URIs it admits).

    Raises:
        ConfigError: malformed, or so broad that it admits everything (no bucket, a bucket of only ``*``,
            or the local root ``/``).
    """
    try:
        loc = canonical_location(prefix, role="allowed prefix")
    except LocationNotAllowed as err:
        raise ConfigError(err.message.replace("is not accepted", "is not a valid prefix"),
                          hint="Prefixes look like s3://bucket/dir or /abs/dir.") from None
    if loc.scheme == "file" and not loc.parts:
        raise ConfigError(f"The allowed prefix {prefix!r} is the file-system root: it would admit every file.",
                          hint="Name a directory, e.g. /data/masks.")
    if loc.scheme != "file" and not loc.bucket.strip("*"):
        raise ConfigError(f"The allowed prefix {prefix!r} names no bucket: it would admit every bucket.",
                          hint="Name the bucket, e.g. s3://masks or s3://masks/team-a.")
    return loc


def parse_prefixes(prefixes: Sequence[str] | str) -> tuple[Location, ...]:
    """:func:`parse_prefix` of each entry (a single string is one prefix)."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return tuple(parse_prefix(p) for p in prefixes)


def _bucket_matches(bucket: str, pattern: str) -> bool:
    if "*" not in pattern:
        return bucket == pattern
    return fnmatch.fnmatchcase(bucket, pattern.replace("[", "[[]").replace("?", "[?]"))


def is_within(location: Location, prefix: Location) -> bool:
    """True when ``location`` is ``prefix`` itself or below it, comparing whole path segments."""
    return (location.scheme == prefix.scheme and _bucket_matches(location.bucket, prefix.bucket)
            and location.parts[: len(prefix.parts)] == prefix.parts)


def check_location(uri: str, prefixes: Sequence[Location] | Sequence[str], *, role: str,
                   setting: str, code: str | None = None) -> str:
    """The canonical form of ``uri`` when it lies within one of ``prefixes``; else :class:`LocationNotAllowed`.

    Args:
        uri: client-supplied URI or absolute local path.
        prefixes: allowed prefixes (:class:`Location` from :func:`parse_prefixes`, or strings).
        role: the request field, for messages (``"output_uri"``, ``"image"``).
        setting: the serve-config setting that lists the prefixes, for the hint.
        code: error code of the refusal (default ``"location_not_allowed"``).

    Returns:
        the canonical URI (``s3://bucket/a/b.nii.gz`` or ``/real/path``) to read or write.

    Raises:
        LocationNotAllowed: malformed / ambiguous (``reason="malformed"``) or outside every prefix
            (``reason="prefix"``); 403 either way.
    """
    allowed = tuple(p if isinstance(p, Location) else parse_prefix(p) for p in prefixes)
    try:
        location = canonical_location(uri, role=role)
    except LocationNotAllowed as err:
        if code:
            err.code = code
        raise
    if any(is_within(location, p) for p in allowed):
        return location.uri
    shown = _shown(uri)
    listed = ", ".join(p.uri for p in allowed) or "none"
    raise LocationNotAllowed(
        f"The {role} {shown!r} is outside the locations this service may use for it (allowed: {listed}).",
        hint=f"Use a location under one of the allowed prefixes; the operator sets them in {setting}.",
        code=code,
        uri=shown,
        reason="prefix",
    )


#: what an ``output_uri`` must end with (the report goes next to it as ``<name>.json``).
MASK_SUFFIX = ".nii.gz"


def check_output_uri(uri: str, prefixes: Sequence[Location] | Sequence[str],
                     setting: str = "allowed_output_prefixes") -> str:
    """The canonical ``output_uri`` (see :func:`check_location`), which must name a ``.nii.gz`` mask.

    Raises:
        LocationNotAllowed: code ``output_not_allowed`` (403): malformed, outside every prefix, or not a
            ``<name>.nii.gz`` (lower case, non-empty name).
    """
    canonical = check_location(uri, prefixes, role="output_uri", setting=setting, code="output_not_allowed")
    name = canonical.rsplit("/", 1)[-1]
    if not name.endswith(MASK_SUFFIX) or name == MASK_SUFFIX:
        raise LocationNotAllowed(f"The output_uri {_shown(uri)!r} must name a mask file <name>{MASK_SUFFIX}.",
                                 hint="e.g. s3://bucket/masks/case1_seg.nii.gz; its report is written next to it "
                                 "as case1_seg.json.", code="output_not_allowed", uri=_shown(uri),
                                 reason="suffix")
    return canonical
