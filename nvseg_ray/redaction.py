"""Redaction of secrets in URIs and free text, for every message, log line, report, manifest and response.

Two kinds of secret travel inside URIs:

* user-info: ``https://user:password@host/...``, ``s3://KEY:SECRET@bucket/...`` -> ``https://***@host/...``
* signed or tokenised query strings: ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``,
  ``sig`` (Azure SAS), ``token``, ``access_token``, ``X-Goog-Signature``, ... -> the value becomes ``***``.

Query parameters that are not secrets stay (they help a person find the object); the keys of secret ones
stay too, so a reader can see that a signed URL was used.

:func:`redact_uri` handles one URI; :func:`redact_text` finds URIs inside arbitrary text (error messages,
exception strings) and redacts each; :func:`redact_env` masks secret-looking environment values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: what replaces a secret.
MASK = "***"

#: query parameter names (lower case) whose values are secrets.
SECRET_QUERY_KEYS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "signature", "sig", "se", "skoid", "sktid", "token", "access_token", "id_token", "refresh_token",
    "api_key", "apikey", "key", "password", "passwd", "secret", "client_secret", "auth", "authorization",
    "code", "awsaccesskeyid",
})
#: environment variable name fragments (upper case) whose values are secrets.
SECRET_ENV_FRAGMENTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "SESSION", "PRIVATE", "API_KEY",
                        "ACCESS_KEY")

# scheme://something, up to whitespace or a quote/bracket that usually ends a URI inside text
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{1,15}://[^\s'\"<>()\[\]{}`]+")


def _redact_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        return MASK if "=" in query else query
    out = [(k, MASK if k.lower() in SECRET_QUERY_KEYS or k.lower().startswith("x-amz-") and k.lower() not in
            ("x-amz-date", "x-amz-expires", "x-amz-signedheaders", "x-amz-algorithm") else v) for k, v in pairs]
    return urlencode(out, safe="*")


def redact_uri(uri: str) -> str:
    """``uri`` with user-info and secret query values replaced by ``***``; other text unchanged.

    Works for any scheme (``https``, ``s3``, ``gs``, ``az``, ``dicomweb+https``, ...) and leaves plain paths
    alone. A string that cannot be parsed as a URI comes back as ``"<invalid URI>"`` when it contains ``@``
    or ``?`` (it could hide a secret), otherwise unchanged.
    """
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<invalid URI>" if ("@" in uri or "?" in uri) else uri
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[-1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_query(parts.query), parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URI inside it passed through :func:`redact_uri`."""
    if "://" not in text:
        return text
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def redact(value: Any) -> Any:
    """Deep copy of a JSON-like value (dict/list/tuple/str) with every string passed through :func:`redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def is_secret_env(name: str) -> bool:
    """Whether an environment variable's value must never be shown (``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ...)."""
    upper = name.upper()
    return any(fragment in upper for fragment in SECRET_ENV_FRAGMENTS)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with secret-looking values masked and URIs in the others redacted."""
    return {k: (MASK if is_secret_env(k) else redact_text(v)) for k, v in env.items()}
