"""Optional bearer-token authentication for the HTTP service.

With ``auth_tokens_file`` set in the serve config, every request except the health probes
(:data:`EXEMPT_PATHS`) must carry ``Authorization: Bearer <token>`` with one of the file's tokens; otherwise
the service answers 401 with a JSON error and ``WWW-Authenticate: Bearer``. The OpenAPI routes (``/docs``,
``/redoc``, ``/openapi.json``) are *not* exempt: with auth on they need the token too.

The tokens file holds one token per line; blank lines and lines starting with ``#`` are ignored; each token
must be at least :data:`MIN_TOKEN_LENGTH` characters of printable ASCII without spaces. On Kubernetes it is a
Secret mounted as a file (cluster/README.md). The file is read at start-up (a missing, unreadable or
token-less file stops the service from starting: it never silently runs open) and re-read whenever its
modification time, size or inode changes, checked on every request -- so a rotated Secret (kubelet swaps the
mounted file) takes effect within the kubelet's sync period without a restart. If a re-read fails, requests
are refused with 503 ``auth_unavailable`` until the file is good again (fail closed).

Only SHA-256 digests of the tokens are kept in memory; a presented token is hashed and compared with every
digest using :func:`hmac.compare_digest`, without stopping at the first match, so the time taken does not
depend on how much of a token was right or on which token matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AuthRequired, AuthUnavailable, ConfigError, NvsegError

__all__ = ["EXEMPT_PATHS", "MIN_TOKEN_LENGTH", "AuthGate", "AuthRequired", "AuthUnavailable", "BearerAuthMiddleware",
           "TokenAuth", "read_tokens", "www_authenticate"]

log = logging.getLogger(__name__)

#: routes answered without a token (Kubernetes probes, load balancers).
EXEMPT_PATHS = frozenset({"/v1/health/live", "/v1/health/ready"})
#: shortest token accepted (e.g. ``openssl rand -hex 32`` gives 64).
MIN_TOKEN_LENGTH = 16


def read_tokens(path: str | os.PathLike[str]) -> frozenset[bytes]:
    """SHA-256 digests of the tokens in ``path`` (one per line; ``#`` comments and blank lines ignored).

    Raises:
        ConfigError: the file is missing or unreadable, holds no token, or a token is too short or has
            characters other than printable, non-space ASCII. Messages never include a token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read the auth tokens file {os.fspath(path)!r}: {type(exc).__name__}.",
                          hint="Mount the tokens Secret at that path, or unset auth_tokens_file.") from None
    digests = set()
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_TOKEN_LENGTH or not all(33 <= ord(c) <= 126 for c in token):
            raise ConfigError(
                f"Line {number} of the auth tokens file {os.fspath(path)!r} is not a usable token "
                f"(at least {MIN_TOKEN_LENGTH} printable ASCII characters, no spaces).",
                hint="Generate tokens with e.g. `openssl rand -hex 32`.")
        digests.add(hashlib.sha256(token.encode("ascii")).digest())
    if not digests:
        raise ConfigError(f"The auth tokens file {os.fspath(path)!r} holds no token.",
                          hint="Put one token per line; an empty file would lock every client out.")
    return frozenset(digests)


def _signature(path: str) -> tuple[int, int, int]:
    st = os.stat(path)  # follows the symlinks of a Kubernetes Secret volume
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass
class _State:
    signature: tuple[int, int, int] | None
    digests: frozenset[bytes]
    error: str | None = None


class TokenAuth:
    """Bearer-token check for one service replica (thread-safe).

    Args:
        tokens_file: path of the tokens file (see the module docstring). Read at once.

    Raises:
        ConfigError: the file is not usable at start-up.
    """

    def __init__(self, tokens_file: str) -> None:
        self.tokens_file = os.fspath(tokens_file)
        self._lock = threading.Lock()
        signature = _signature_or_none(self.tokens_file)
        self._state = _State(signature, read_tokens(self.tokens_file))

    def _current(self) -> _State:
        try:
            signature: tuple[int, int, int] | None = _signature(self.tokens_file)
        except OSError:
            signature = None
        state = self._state
        if signature is not None and signature == state.signature:
            return state
        with self._lock:
            if self._state.signature != signature or signature is None:
                try:
                    self._state = _State(signature, read_tokens(self.tokens_file))
                    log.info("auth tokens re-read from %s", self.tokens_file)
                except ConfigError as err:
                    log.error("auth tokens file unusable, refusing all requests: %s", err.message)
                    self._state = _State(signature, frozenset(), error=err.message)
            return self._state

    def check(self, path: str, headers: Mapping[str, str]) -> NvsegError | None:
        """``None`` when the request may proceed, else the error to answer with (401 or 503).

        Args:
            path: the request path (``/v1/...``); :data:`EXEMPT_PATHS` always pass.
            headers: the request headers (case-insensitive mapping, e.g. Starlette's ``request.headers``).
        """
        if path in EXEMPT_PATHS:
            return None
        state = self._current()
        if state.error is not None:
            return AuthUnavailable("Authentication is temporarily unavailable on this replica.",
                                   hint="Retry later; the operator must fix the auth tokens file.")
        scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return AuthRequired("This service needs a bearer token.",
                                hint="Send the header 'Authorization: Bearer <token>'; ask the operator for a token.")
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for digest in state.digests:  # no early exit: time does not depend on which token matched
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            return AuthRequired("The bearer token is not valid for this service.",
                                hint="Check the token (tokens are rotated by the operator).")
        return None


def _signature_or_none(path: str) -> tuple[int, int, int] | None:
    try:
        return _signature(path)
    except OSError:
        return None


def www_authenticate(err: NvsegError) -> dict[str, Any]:
    """Response headers for an auth error: ``WWW-Authenticate: Bearer`` on 401."""
    if isinstance(err, AuthRequired):
        error = ', error="invalid_token"' if "not valid" in err.message else ""
        return {"WWW-Authenticate": f'Bearer realm="nvseg"{error}'}
    return {}


class AuthGate:
    """This process's token check, set when the service replica starts (``None``: authentication off)."""

    def __init__(self) -> None:
        self.auth: TokenAuth | None = None

    def configure(self, tokens_file: str | None) -> None:
        """Turn authentication on with ``tokens_file`` (read now; ConfigError if unusable) or off with ``None``."""
        self.auth = TokenAuth(tokens_file) if tokens_file else None


class BearerAuthMiddleware:
    """ASGI middleware: answers 401/503 JSON for requests :meth:`TokenAuth.check` refuses, before any body is read.

    Add it last (outermost), e.g. ``app.add_middleware(BearerAuthMiddleware, gate=GATE)``, so unauthenticated
    requests never reach body parsing or the routes.
    """

    def __init__(self, app: Any, gate: AuthGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        auth = self.gate.auth
        if scope.get("type") != "http" or auth is None:
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        path = scope.get("path") or "/"
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        err = auth.check(path, Headers(scope=scope))
        if err is None:
            await self.app(scope, receive, send)
            return
        status = err.http_status
        headers = www_authenticate(err)
        if status == 503:
            headers["Retry-After"] = "5"
        response = JSONResponse({"error": err.to_dict()}, status_code=status, headers=headers)
        await response(scope, receive, send)
