"""DICOMweb in and out: find series with QIDO-RS, read them with WADO-RS, store results with STOW-RS.

Built on ``dicomweb-client`` (imported on first use; ``pip install 'nvseg-ray[dicom]'``).

URL forms (:func:`parse_url`; ``<root>`` is the service root, e.g. ``https://pacs.example.org/dicom-web``):

* a study: ``<root>/studies/<StudyInstanceUID>`` -- every image series of the study;
* a series: ``<root>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``;
* an instance: ``<root>/studies/<uid>/series/<uid>/instances/<SOPInstanceUID>`` (the locator
  :class:`~nvseg_ray.dicom.series.DicomInstance` carries for DICOMweb instances);
* a QIDO-RS query: ``<root>/series?Modality=CT&StudyInstanceUID=1.2,1.3`` (series matching the filters; a comma
  separates the values of a UID list, PS3.18 8.3.4.1), ``<root>/studies?StudyDate=20240101-`` (every image
  series of the matching studies), ``<root>/studies/<uid>/series?Modality=MR`` (series of one study);
* a bare root, for ``--output`` (STOW-RS): ``dicomweb+https://pacs.example.org/dicom-web`` (the
  ``dicomweb+`` prefix also marks any of the forms above as DICOMweb).

Authentication, first match wins: user-info in the URL (``https://user:pass@host/...``), then
``NVSEG_DICOMWEB_TOKEN`` (sent as ``Authorization: Bearer <token>``), then ``NVSEG_DICOMWEB_USERNAME`` +
``NVSEG_DICOMWEB_PASSWORD`` (HTTP basic). Credentials are never part of a message, a log line, a
:class:`DicomSeries` or an instance locator: URLs are stripped of their user-info before anything keeps them.
Credentials given in a URL are remembered for that service root in this process only (so
:func:`retrieve_series` of a series :func:`discover` found works in ``nvseg segment``); Ray workers of the batch
job read the environment variables.

Errors: HTTP and network failures become :class:`~nvseg_ray.errors.StorageError` with ``details["reason"]``
``not_found`` (HTTP 404 or a study/series URL that names nothing), ``permission_denied`` (401/403) or
``io_error`` (connection refused, timeout, TLS, 5xx: answered 502/504 by the Serve app); a malformed URL is a
:class:`~nvseg_ray.errors.ConfigError` (``invalid_dicomweb_url``); an instance that is not readable DICOM or went
missing since discovery is a :class:`~nvseg_ray.errors.DicomError`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..errors import (
    REASON_IO_ERROR,
    REASON_MISSING_PACKAGE,
    REASON_NOT_FOUND,
    REASON_PERMISSION_DENIED,
    ConfigError,
    DicomError,
    StorageError,
)
from ..redaction import redact_text, redact_uri
from .grouping import NON_IMAGE_MODALITIES, group_series
from .series import DicomSeries

logger = logging.getLogger(__name__)

ENV_TOKEN = "NVSEG_DICOMWEB_TOKEN"
ENV_USERNAME = "NVSEG_DICOMWEB_USERNAME"
ENV_PASSWORD = "NVSEG_DICOMWEB_PASSWORD"

#: URL scheme prefix that marks a DICOMweb root explicitly (``dicomweb+https://host/dicom-web``).
SCHEME_PREFIX = "dicomweb+"

#: Seconds to open a TCP/TLS connection: a reachable PACS answers in milliseconds; 10 s fails a wrong host or a
#: firewalled port quickly instead of hanging a batch worker.
CONNECT_TIMEOUT_S = 10.0
#: Seconds the server may stay silent while answering (between two reads of the socket, not for the whole
#: transfer): archives that fetch a series from a slow storage tier take tens of seconds before the first byte;
#: 120 s lets them finish and bounds a server that never answers.
READ_TIMEOUT_S = 120.0
#: The ``timeout`` every request is sent with (``requests``' ``(connect, read)`` form).
REQUEST_TIMEOUT = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
#: Attempts per request. dicomweb-client retries after any exception (connection refused, a timeout) and after
#: HTTP 429/408/503/504, waiting 2 s before the second attempt: a PACS that restarts or is busy for a moment is
#: tried again, and the worst case stays bounded (2 x 120 s + 2 s for a server that accepts and never answers).
MAX_ATTEMPTS = 2

#: Concurrent QIDO instance searches of :func:`discover` (one per series) and WADO-RS instance retrievals of a
#: split series: 8 keeps a study of dozens of series quick without flooding the archive.
THREADS = 8

#: What the original transfer syntax is asked with (WADO-RS ``transfer-syntax=*``): servers such as Orthanc 1.10
#: cannot transcode JPEG 2000 and answer 500 to a request for the default (uncompressed) syntax; pydicom's
#: plugins decode whatever comes.
ORIGINAL_SYNTAX = (("application/dicom", "*"),)

#: The instance attributes discovery needs (QIDO ``includefield``; from the series metadata when a server
#: ignores includefield). No patient attribute is ever kept.
INSTANCE_FIELDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                   "SeriesDescription", "FrameOfReferenceUID", "ImageOrientationPatient", "Rows", "Columns",
                   "ImageType", "NumberOfFrames")
#: The series attributes asked of QIDO-RS.
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances")
#: Query keys that are QIDO-RS controls, not attribute filters.
_CONTROL_KEYS = frozenset({"includefield", "limit", "offset", "fuzzymatching"})

#: How a UID may look inside a URL path (digits and dots, at most 64 characters): anything else could change
#: the path (``..``, ``/``) and is refused.
_UID = re.compile(r"[0-9][0-9.]{0,63}")

@dataclass(frozen=True)
class DicomwebRef:
    """A parsed DICOMweb URL (:func:`parse_url`); every URL in it is without user-info.

    Attributes:
        root: the service root, plain ``http(s)://host[:port]/path`` (no ``dicomweb+``, no trailing ``/``).
        study_uid / series_uid / sop_uid: the UIDs named by the path ("" when not named).
        query: QIDO-RS filters of a query URL, as ``(key, value)`` pairs in URL order (``()`` for none).
        query_level: ``"series"`` or ``"studies"`` for a query URL (the last path element), else ``""``.
    """

    root: str
    study_uid: str = ""
    series_uid: str = ""
    query: tuple[tuple[str, str], ...] = ()
    query_level: str = ""
    sop_uid: str = ""

    @property
    def is_query(self) -> bool:
        return bool(self.query_level)

    @property
    def is_root(self) -> bool:
        """True for a bare service root (no study, series or query)."""
        return not (self.study_uid or self.query_level)

    def url(self) -> str:
        """The URL this reference names (credentials-free), e.g. ``<root>/studies/<uid>/series/<uid>``."""
        text = self.root
        if self.study_uid:
            text += f"/studies/{self.study_uid}"
        if self.series_uid:
            text += f"/series/{self.series_uid}"
        if self.sop_uid:
            text += f"/instances/{self.sop_uid}"
        if self.query_level:
            text += f"/{self.query_level}"
        if self.query:
            text += "?" + urlencode(self.query, safe=",*")
        return text


@dataclass(frozen=True)
class _Auth:
    """Credentials for one request session; never printed (``repr`` shows only the kind)."""

    kind: str = ""  # "", "bearer", "basic"
    token: str = field(default="", repr=False)
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)


#: Credentials given as URL user-info, by service root (this process only; see the module docstring).
_URL_CREDENTIALS: dict[str, _Auth] = {}
_URL_CREDENTIALS_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------------------
# URLs
# ------------------------------------------------------------------------------------------------------------


def _strip_prefix(uri: str) -> str:
    return uri[len(SCHEME_PREFIX):] if uri.lower().startswith(SCHEME_PREFIX) else uri


def _path_elements(path: str) -> list[str]:
    return [unquote(p) for p in path.split("/") if p]


def is_dicomweb_url(uri: str) -> bool:
    """True for ``dicomweb+http(s)://...``, and for a plain ``http(s)://`` URL whose path has a
    ``/studies/<uid>`` part or ends in ``/series`` or ``/studies`` (a QIDO-RS query). Looks at the text only."""
    if not isinstance(uri, str):
        return False
    lower = uri.lower()
    if lower.startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://")):
        return True
    if not lower.startswith(("http://", "https://")):
        return False
    try:
        parts = _path_elements(urlsplit(uri).path)
    except ValueError:
        return False
    if parts and parts[-1] in ("series", "studies"):
        return True
    return any(p == "studies" and i + 1 < len(parts) and _UID.fullmatch(parts[i + 1])
               for i, p in enumerate(parts))


def _invalid(uri: str, why: str) -> ConfigError:
    return ConfigError(f"not a usable DICOMweb URL: {redact_uri(uri)} ({why})",
                       hint="use <root>/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>], a QIDO-RS query "
                            "<root>/series?Modality=CT&StudyInstanceUID=<uid>,<uid>, or dicomweb+https://<host>/<root>"
                            " for a service root",
                       code="invalid_dicomweb_url", uri=redact_uri(uri))


def _split_credentials(uri: str) -> tuple[str, _Auth | None]:
    """``(uri without user-info, credentials from the user-info or None)``."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    auth = _Auth(kind="basic", username=unquote(user), password=unquote(password))
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), auth


def parse_url(uri: str) -> DicomwebRef:
    """Parse a DICOMweb URL (see the module docstring for the forms) into a :class:`DicomwebRef`.

    Credentials in the URL are dropped from the reference (:func:`discover` and friends read them separately).

    Raises:
        ConfigError: ``invalid_dicomweb_url`` -- not http(s), a malformed UID, or a path this module cannot read.
    """
    text = _strip_prefix(uri.strip())
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise _invalid(uri, str(exc)) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _invalid(uri, "the scheme must be http, https, dicomweb+http or dicomweb+https, with a host")
    host = parts.netloc.rsplit("@", 1)[-1]
    elements = _path_elements(parts.path)
    query = tuple(parse_qsl(parts.query, keep_blank_values=False))
    # the service root is everything before the first DICOMweb resource element
    start = next((i for i, p in enumerate(elements) if p in ("studies", "series")), len(elements))
    root_path = "/".join(elements[:start])
    root = urlunsplit((parts.scheme.lower(), host, f"/{root_path}" if root_path else "", "", "")).rstrip("/")
    rest = elements[start:]
    study = series = sop = level = ""
    i = 0
    while i < len(rest):
        element = rest[i]
        value = rest[i + 1] if i + 1 < len(rest) else ""
        expected = {0: ("studies", "series"), 2: ("series",), 4: ("instances",)}.get(i, ())
        if element not in expected or (element == "series" and i == 0 and value):
            raise _invalid(uri, f"unexpected path element {element!r}")
        if not value:  # the last element names a QIDO level: .../series, .../studies, .../studies/<uid>/series
            if element == "instances":
                raise _invalid(uri, "an instance search is not a series; name the series instead")
            level = element
            break
        if not _UID.fullmatch(value):
            raise _invalid(uri, f"{value!r} is not a DICOM UID")
        if element == "studies":
            study = value
        elif element == "series":
            series = value
        else:
            sop = value
        i += 2
    if query and not level:
        raise _invalid(uri, "query parameters only go with a QIDO-RS search (a path ending in /series or /studies)")
    return DicomwebRef(root=root, study_uid=study, series_uid=series, query=query, query_level=level, sop_uid=sop)


def public_url(uri: str) -> str:
    """``uri`` without user-info and ``dicomweb+`` prefix and with secret query values masked: what messages and
    :attr:`DicomSeries.source` show."""
    try:
        stripped, _ = _split_credentials(_strip_prefix(uri))
    except ValueError:
        return redact_uri(uri)
    return redact_uri(stripped)


# ------------------------------------------------------------------------------------------------------------
# Sessions, credentials, errors
# ------------------------------------------------------------------------------------------------------------


def _dicomweb_client() -> Any:
    try:
        import dicomweb_client
    except ImportError as exc:
        raise StorageError(f"DICOMweb access needs the package dicomweb-client, which is not installed ({exc})",
                           hint="pip install 'nvseg-ray[dicom]' (on every Ray worker too)",
                           reason=REASON_MISSING_PACKAGE, package="dicomweb-client") from None
    return dicomweb_client


def _env_auth() -> _Auth | None:
    token = os.environ.get(ENV_TOKEN, "").strip()
    if token:
        return _Auth(kind="bearer", token=token)
    user = os.environ.get(ENV_USERNAME, "")
    if user:
        return _Auth(kind="basic", username=user, password=os.environ.get(ENV_PASSWORD, ""))
    return None


def _resolve(uri: str) -> tuple[DicomwebRef, _Auth | None]:
    """The reference and the credentials to use for ``uri`` (URL user-info, remembered per root, or env)."""
    text = _strip_prefix(uri.strip())
    try:
        stripped, url_auth = _split_credentials(text)
    except ValueError as exc:
        raise _invalid(uri, str(exc)) from None
    ref = parse_url(stripped)
    if url_auth is not None:
        with _URL_CREDENTIALS_LOCK:
            _URL_CREDENTIALS[ref.root] = url_auth
        return ref, url_auth
    with _URL_CREDENTIALS_LOCK:
        remembered = _URL_CREDENTIALS.get(ref.root)
    return ref, remembered or _env_auth()


def _client(ref: DicomwebRef, auth: _Auth | None) -> Any:
    """A ``DICOMwebClient`` on a fresh ``requests`` session for ``ref.root`` (one per thread)."""
    web = _dicomweb_client()
    import requests

    session = requests.Session()
    if auth is not None and auth.kind == "bearer":
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth is not None and auth.kind == "basic":
        session.auth = (auth.username, auth.password)
    # chunk_size: one STOW-RS body is sent as bytes, never as chunked transfer encoding: dicomweb-client streams
    # larger bodies from a generator that a retry would find exhausted (an empty second attempt).
    client = web.DICOMwebClient(ref.root, session=session, timeout=REQUEST_TIMEOUT, permissive_uid=True,
                                chunk_size=1 << 62)
    client.set_http_retry_params(retry=True, max_attempts=MAX_ATTEMPTS, wait_exponential_multiplier=1000)
    # dicomweb-client sends "Host: <host>" without the port; a server behind a proxy needs host:port
    client.host = urlsplit(ref.root).netloc
    weakref.finalize(client, session.close)  # its pooled connections close with the client (one per call site)
    return client


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None and exc.args and isinstance(exc.args[0], BaseException):
            nxt = exc.args[0]
        if nxt is None:
            reason = getattr(exc, "reason", None)
            nxt = reason if isinstance(reason, BaseException) else None
        if nxt is None:
            break
        exc = nxt
    return exc


def _network_reason(exc: BaseException) -> str:
    import socket

    cause = _root_cause(exc)
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return "host name not resolved"
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return "connection timed out"
    text = str(cause)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "host name not resolved"
    return type(cause).__name__


def _server_message(response: Any) -> str:
    """A short, redacted excerpt of an error answer (Orthanc puts its reason in JSON ``Message``)."""
    try:
        body = response.json()
        text = str(body.get("Message") or body.get("message") or body.get("Details") or "") \
            if isinstance(body, dict) else ""
    except Exception:
        text = ""
    if not text:
        try:
            text = response.text or ""
        except Exception:
            text = ""
    text = " ".join(text.split())[:200]
    return redact_text(text)


def _auth_hint(auth: _Auth | None) -> str:
    used = {"bearer": f"the bearer token from {ENV_TOKEN}",
            "basic": "basic-auth credentials"}.get(auth.kind if auth else "", "no credentials")
    return (f"the request was sent with {used}; set {ENV_TOKEN} (bearer) or {ENV_USERNAME} and {ENV_PASSWORD} "
            "(basic) to credentials the server accepts -- in the environment of every Ray worker too (credentials "
            "given in a URL reach only the process that read the URL)")


def _storage_error(exc: BaseException, url: str, action: str, auth: _Auth | None) -> StorageError:
    """Translate a ``requests`` / dicomweb-client failure of ``action`` on ``url`` (credentials-free)."""
    import requests

    shown = public_url(url)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = int(exc.response.status_code)
        said = _server_message(exc.response)
        said = f": {said}" if said else ""
        if status in (401, 403):
            what = "authentication required or the credentials were refused" if status == 401 else "access denied"
            return StorageError(f"DICOMweb server refused to {action} {shown}: HTTP {status} ({what})",
                                hint=_auth_hint(auth), reason=REASON_PERMISSION_DENIED, uri=shown, status=status)
        if status == 404:
            return StorageError(f"DICOMweb server has nothing at {shown} ({action}: HTTP 404{said})",
                                hint="check the study/series UIDs and the service root (often .../dicom-web or "
                                     ".../dicomweb); a QIDO-RS search lists what the server holds",
                                reason=REASON_NOT_FOUND, uri=shown, status=status)
        return StorageError(f"DICOMweb server failed to {action} {shown}: HTTP {status}{said}",
                            hint="the server rejected or could not answer the request; its log says why "
                                 "(5xx: retry later or ask its operator)",
                            reason=REASON_IO_ERROR, uri=shown, status=status,
                            http_status=502 if status >= 500 else 422)
    if isinstance(exc, requests.Timeout):
        return StorageError(f"DICOMweb server at {shown} did not answer to {action} within "
                            f"{CONNECT_TIMEOUT_S:g} s (connect) / {READ_TIMEOUT_S:g} s (read)",
                            hint="check that the server is up and reachable from this machine",
                            reason=REASON_IO_ERROR, uri=shown, http_status=504)
    if isinstance(exc, requests.exceptions.SSLError):
        return StorageError(f"TLS failed talking to the DICOMweb server at {shown} ({action})",
                            hint="check the server certificate; a private CA goes in REQUESTS_CA_BUNDLE",
                            reason=REASON_IO_ERROR, uri=shown, http_status=502)
    if isinstance(exc, requests.ConnectionError):
        return StorageError(f"cannot connect to the DICOMweb server at {shown} to {action} "
                            f"({_network_reason(exc)})",
                            hint="check that the server is running and that the URL's scheme, host, port and root "
                                 "path (e.g. /dicom-web) are right and reachable from this machine",
                            reason=REASON_IO_ERROR, uri=shown, http_status=502)
    return StorageError(f"DICOMweb request to {action} {shown} failed ({type(exc).__name__}: "
                        f"{redact_text(str(exc))[:200]})",
                        hint="check the URL and the server", reason=REASON_IO_ERROR, uri=shown, http_status=502)


def _call(fn: Any, url: str, action: str, auth: _Auth | None) -> Any:
    """``fn()`` with its HTTP / network failures turned into :class:`StorageError` (see the module docstring)."""
    import requests

    try:
        return fn()
    except requests.RequestException as exc:
        raise _storage_error(exc, url, action, auth) from None
    except ValueError as exc:  # dicomweb-client: an unexpected media type or a malformed multipart answer
        raise StorageError(f"DICOMweb server at {public_url(url)} sent an answer that cannot be read ({action}: "
                           f"{redact_text(str(exc))[:200]})", hint="check that the URL names a DICOMweb service",
                           reason=REASON_IO_ERROR, uri=public_url(url), http_status=502) from None
    except Exception as exc:
        if type(exc).__module__.startswith("pydicom"):  # a part of a WADO-RS answer is not DICOM
            raise _decode_error(exc, url) from None
        raise


# ------------------------------------------------------------------------------------------------------------
# Discovery (QIDO-RS)
# ------------------------------------------------------------------------------------------------------------


def _json_value(item: Mapping[str, Any], keyword: str) -> Any:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    element = item.get(f"{tag:08X}")
    if not element:
        return None
    values = element.get("Value")
    if not values:
        return None
    return values[0]


def _header(item: Mapping[str, Any], series_item: Mapping[str, Any]) -> Any:
    """A ``pydicom.Dataset`` of the :data:`INSTANCE_FIELDS` (plus the shared functional groups, which carry the
    orientation of enhanced objects) of one QIDO / metadata answer; series attributes fill what it lacks."""
    from pydicom import Dataset
    from pydicom.datadict import tag_for_keyword

    wanted = {f"{tag_for_keyword(k):08X}" for k in INSTANCE_FIELDS + ("SharedFunctionalGroupsSequence",)}
    kept = {tag: element for tag, element in item.items() if tag in wanted}
    for tag, element in series_item.items():
        if tag in wanted and tag not in kept:
            kept[tag] = element
    return Dataset.from_json(kept)


def _series_uids(item: Mapping[str, Any]) -> tuple[str, str]:
    return str(_json_value(item, "StudyInstanceUID") or ""), str(_json_value(item, "SeriesInstanceUID") or "")


def _instance_url(root: str, study: str, series: str, sop: str) -> str:
    return f"{root}/studies/{study}/series/{series}/instances/{sop}"


def _instances_of(ref: DicomwebRef, auth: _Auth | None, series_item: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(locator, header)`` of every instance of one series: QIDO-RS with includefield, or the series metadata
    (WADO-RS) when the server left out the image attributes."""
    study, series = _series_uids(series_item)
    client = _client(ref, auth)
    where = f"{ref.root}/studies/{study}/series/{series}"
    items = _call(lambda: client.search_for_instances(study, series, fields=list(INSTANCE_FIELDS),
                                                      get_remaining=True),
                  where + "/instances", "search the instances of", auth)
    if items and any(_json_value(i, "Rows") is None for i in items) and \
            str(_json_value(series_item, "Modality") or "").upper() not in NON_IMAGE_MODALITIES:
        items = _call(lambda: client.retrieve_series_metadata(study, series), where + "/metadata",
                      "read the metadata of", auth)
    out = []
    for item in items:
        sop = str(_json_value(item, "SOPInstanceUID") or "")
        if not sop or (ref.sop_uid and sop != ref.sop_uid):
            continue
        out.append((_instance_url(ref.root, study, series, sop), _header(item, series_item)))
    return out


def _search_series(ref: DicomwebRef, auth: _Auth | None) -> list[dict]:
    """The QIDO-RS series answers ``ref`` names."""
    client = _client(ref, auth)
    filters: dict[str, str] = {}
    params: dict[str, Any] = {}
    for key, value in ref.query:
        if key.lower() in _CONTROL_KEYS:
            if key.lower() == "fuzzymatching":
                params["fuzzymatching"] = value.lower() == "true"
            continue  # includefield / limit / offset: discovery asks for what it needs and pages through all
        filters[key] = f"{filters[key]},{value}" if key in filters else value

    def series_of(study: str | None, extra: Mapping[str, str]) -> list[dict]:
        where = f"{ref.root}/studies/{study}/series" if study else f"{ref.root}/series"
        return _call(lambda: client.search_for_series(study_instance_uid=study, fields=list(SERIES_FIELDS),
                                                      search_filters=dict(extra) or None, get_remaining=True,
                                                      **params),
                     where, "search the series of", auth)

    if ref.series_uid:
        return series_of(ref.study_uid, {"SeriesInstanceUID": ref.series_uid})
    if ref.study_uid:
        return series_of(ref.study_uid, filters if ref.query_level == "series" else {})
    if ref.query_level == "series":
        return series_of(None, filters)
    # a study-level query: every series of every matching study
    studies = _call(lambda: client.search_for_studies(fields=["StudyInstanceUID"], search_filters=filters or None,
                                                      get_remaining=True, **params),
                    f"{ref.root}/studies", "search the studies of", auth)
    found: list[dict] = []
    for study_item in studies:
        study_uid = str(_json_value(study_item, "StudyInstanceUID") or "")
        if study_uid:
            found.extend(series_of(study_uid, {}))
    return found


def discover(uri: str) -> tuple[list[DicomSeries], Counter]:
    """The image series a DICOMweb study, series, instance or QIDO-RS query URL names -- headers only.

    One QIDO-RS series search, then one instance search per image series (concurrently, :data:`THREADS`).
    Non-image series (:data:`NON_IMAGE_MODALITIES`: SR, PR, KO, SEG, RT*, ...) are skipped before their instances
    are asked for; instances are grouped into stacks and localizers dropped by the same rules as files
    (:func:`nvseg_ray.dicom.grouping.group_series`).

    Returns:
        ``(series, skipped)``: the series sorted by study, series UID and split, each with
        ``source = public_url(uri)`` and instance locators ``<root>/studies/<st>/series/<se>/instances/<sop>``
        (``n_frames`` from NumberOfFrames); ``skipped`` counts skipped instances by reason
        (``no_image:<Modality>``, ``localizer``, ...; a non-image series counts its
        NumberOfSeriesRelatedInstances, or 1 when the server does not say).

    Raises:
        ConfigError: ``invalid_dicomweb_url``; also for a bare service root (nothing to discover).
        StorageError: ``not_found`` when a study/series URL names nothing on the server; ``permission_denied``,
            ``io_error`` (see the module docstring).
    """

    ref, auth = _resolve(uri)
    if ref.is_root:
        raise _invalid(uri, "a service root names no series; give a study, a series or a QIDO-RS query")
    source = public_url(uri)
    series_items = _search_series(ref, auth)
    if not series_items and not ref.is_query:
        raise StorageError(f"DICOMweb server has no {'series' if ref.series_uid else 'study'} at {source}",
                           hint="check the UIDs and the service root; a QIDO-RS search (<root>/studies?...) lists "
                                "what the server holds", reason=REASON_NOT_FOUND, uri=source)
    skipped: Counter = Counter()
    image_items = []
    for item in series_items:
        modality = str(_json_value(item, "Modality") or "").upper()
        if modality in NON_IMAGE_MODALITIES:
            count = _json_value(item, "NumberOfSeriesRelatedInstances")
            skipped[f"no_image:{modality}"] += int(count) if count else 1
        else:
            image_items.append(item)
    headers: list[tuple[str, Any]] = []
    if image_items:
        with ThreadPoolExecutor(max_workers=min(THREADS, len(image_items))) as pool:
            for found in pool.map(lambda item: _instances_of(ref, auth, item), image_items):
                headers.extend(found)
    series = group_series(source, headers, skipped)
    logger.debug("DICOMweb discovery of %s: %d series, skipped %s", source, len(series), dict(skipped))
    return series, skipped


# ------------------------------------------------------------------------------------------------------------
# Retrieval (WADO-RS), storage (STOW-RS), existence (QIDO-RS)
# ------------------------------------------------------------------------------------------------------------


def _decode_error(exc: BaseException, where: str) -> DicomError:
    return DicomError(f"{public_url(where)} did not come back as readable DICOM ({type(exc).__name__})",
                      hint="check the instance on the server (re-send it from the modality or PACS)",
                      code="dicom_unreadable", uri=public_url(where))


def retrieve_series(series: DicomSeries) -> list[Any]:
    """Full ``pydicom.Dataset`` objects (pixel data included) of a series :func:`discover` found, in the order of
    ``series.instances``, in their original transfer syntax (:data:`ORIGINAL_SYNTAX`).

    A whole series is one WADO-RS request; a split series (one SeriesInstanceUID holding several stacks, see
    :attr:`DicomSeries.split`) fetches only its own instances, concurrently. Instances on the server that
    discovery dropped (localizers, other stacks) are left out.

    Raises:
        DicomError: ``dicom_unreadable`` -- an instance of the series is no longer on the server (the series
            changed since discovery) or is not readable DICOM.
        StorageError: ``not_found``, ``permission_denied``, ``io_error``.
    """
    if not series.instances:
        raise DicomError(f"series {series.key} of {public_url(series.source)} has no instances",
                         code="no_dicom_series", series_uid=series.series_instance_uid)
    ref, auth = _resolve(series.instances[0].uri)
    study = ref.study_uid or series.study_instance_uid
    series_uid = ref.series_uid or series.series_instance_uid
    where = f"{ref.root}/studies/{study}/series/{series_uid}"
    wanted = [i.sop_instance_uid for i in series.instances]
    if series.split or len(wanted) == 1:
        def one(sop: str) -> Any:
            client = _client(ref, auth)
            return _call(lambda: client.retrieve_instance(study, series_uid, sop, media_types=ORIGINAL_SYNTAX),
                         _instance_url(ref.root, study, series_uid, sop), "retrieve", auth)

        with ThreadPoolExecutor(max_workers=min(THREADS, len(wanted))) as pool:
            datasets = list(pool.map(one, wanted))
    else:
        client = _client(ref, auth)
        datasets = _call(lambda: client.retrieve_series(study, series_uid, media_types=ORIGINAL_SYNTAX),
                         where, "retrieve", auth)
    by_uid: dict[str, Any] = {}
    for ds in datasets:
        if not hasattr(ds, "get"):
            raise _decode_error(TypeError(type(ds).__name__), where)
        uid = str(ds.get("SOPInstanceUID", ""))
        by_uid.setdefault(uid, ds)
    missing = [uid for uid in wanted if uid not in by_uid]
    if missing:
        raise DicomError(f"{len(missing)} of the {len(wanted)} instances of series {series.key} are no longer on "
                         f"{public_url(where)} (the series changed since it was discovered)",
                         hint="run the job again: discovery then sees the series as it is now",
                         code="dicom_unreadable", series_uid=series.series_instance_uid,
                         missing_instances=missing[:10])
    return [by_uid[uid] for uid in wanted]


def _failed_sops(answer: Any) -> list[str]:
    """``"<SOPInstanceUID> (reason 0x....)"`` for every instance a STOW-RS answer lists as failed."""
    out = []
    for item in (answer.get("FailedSOPSequence") or []) if answer is not None else []:
        reason = item.get("FailureReason")
        out.append(f"{item.get('ReferencedSOPInstanceUID', '?')}"
                   + (f" (reason 0x{int(reason):04X})" if reason is not None else ""))
    return out


def _as_part10(ds: Any) -> Any:
    """``ds`` as a PS3.10 file (preamble, ``DICM``, complete file meta), which STOW-RS bodies must be:
    dicomweb-client writes a dataset as it is, and one without a preamble (pydicom 3 adds none unless asked) is
    stored by Orthanc as a file that its own WADO-RS then serves unreadable. ``ds`` itself is not changed."""
    import io

    import pydicom

    meta = getattr(ds, "file_meta", None)
    if getattr(ds, "preamble", None) and meta is not None and "TransferSyntaxUID" in meta:
        return ds
    if meta is None or "TransferSyntaxUID" not in meta:  # native data without file meta: explicit VR LE
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        ds = copy.copy(ds)
        ds.file_meta = FileMetaDataset(meta or {})
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def store(root: str, datasets: Sequence[Any]) -> None:
    """Store ``datasets`` (``pydicom.Dataset``) with one STOW-RS request to ``root`` (``dicomweb+https://...``,
    a plain service root, or a study URL). When all datasets belong to one study the request goes to
    ``<root>/studies/<StudyInstanceUID>`` (the server then refuses anything of another study).

    Raises:
        StorageError: ``permission_denied``, ``not_found``, ``io_error`` -- also when the server's answer lists
            failed instances (FailedSOPSequence; their SOP Instance UIDs and reason codes are in the message).
    """
    if not datasets:
        return
    ref, auth = _resolve(root)
    if ref.is_query or ref.series_uid:
        raise _invalid(root, "STOW-RS goes to a service root (dicomweb+https://host/dicom-web) or a study URL")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    study = studies.pop() if len(studies) == 1 else None
    if ref.study_uid and study not in (None, ref.study_uid):
        raise ConfigError(f"refusing to store instances of study {study} into {public_url(root)}, another study",
                          hint="point the output at the service root", code="invalid_dicomweb_url")
    client = _client(ref, auth)
    where = f"{ref.root}/studies" + (f"/{study}" if study else "")
    files = [_as_part10(ds) for ds in datasets]
    answer = _call(lambda: client.store_instances(files, study_instance_uid=study or None), where,
                   "store instances into", auth)
    failed = _failed_sops(answer)
    if failed:
        raise StorageError(f"DICOMweb server at {public_url(where)} refused {len(failed)} of {len(datasets)} "
                           f"instances: {', '.join(failed[:5])}",
                           hint="the reason codes are PS3.18 STOW-RS failure reasons (0xA7xx: out of resources, "
                                "0xA9xx: data set does not match SOP class, 0xC000: cannot understand); the "
                                "server's log has the details", reason=REASON_IO_ERROR, uri=public_url(where),
                           failed_instances=failed[:20])
    logger.debug("stored %d instances into %s", len(datasets), public_url(where))


def series_exists(root: str, study_uid: str, series_uid: str) -> bool:
    """Whether the server at ``root`` holds series ``series_uid`` of study ``study_uid`` (one QIDO-RS search;
    the batch job's resume check for a SEG written with STOW-RS).

    Raises:
        ConfigError: a malformed URL or UID.
        StorageError: ``permission_denied``, ``io_error``.
    """
    ref, auth = _resolve(root)
    for uid in (study_uid, series_uid):
        if not _UID.fullmatch(uid or ""):
            raise _invalid(root, f"{uid!r} is not a DICOM UID")
    client = _client(ref, auth)
    where = f"{ref.root}/studies/{study_uid}/series"
    items = _call(lambda: client.search_for_series(study_instance_uid=study_uid, fields=["SeriesInstanceUID"],
                                                   search_filters={"SeriesInstanceUID": series_uid}),
                  where, "search the series of", auth)
    return any(_series_uids(item)[1] == series_uid for item in items)


def forget_url_credentials() -> None:
    """Drop the credentials remembered from URLs (tests; a long-lived process that is done with a server)."""
    with _URL_CREDENTIALS_LOCK:
        _URL_CREDENTIALS.clear()


__all__ = [
    "CONNECT_TIMEOUT_S", "ENV_PASSWORD", "ENV_TOKEN", "ENV_USERNAME", "NON_IMAGE_MODALITIES", "ORIGINAL_SYNTAX",
    "READ_TIMEOUT_S", "REQUEST_TIMEOUT", "DicomwebRef", "discover", "forget_url_credentials", "is_dicomweb_url",
    "parse_url", "public_url", "retrieve_series", "series_exists", "store",
]
