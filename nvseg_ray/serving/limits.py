"""Request-body limits of the HTTP service, enforced before and while a body arrives (an ASGI middleware).

FastAPI reads (and for multipart, spools to disk) a whole body before a route runs, so a size check inside a
route comes too late: a declared ``Content-Length`` of 100 GB would be streamed in first. :class:`BodyLimit`
wraps the app instead:

* a declared ``Content-Length`` above the route's cap is refused with 413 before one body byte is read;
* a body without a length (``Transfer-Encoding: chunked``) is counted as it arrives and refused with 413 the
  moment it passes the cap (the rest is never read; the connection is closed by the server);
* JSON routes get a small cap (:data:`DEFAULT_MAX_JSON_KB`), upload routes (multipart) the upload cap plus
  :data:`MULTIPART_OVERHEAD_BYTES` for the form's other fields and part headers.

Error bodies are the service's ``{"error": {"code", "message", "hint"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from ..errors import PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: JSON request bodies (inference/job requests are a URI and a few prompts: a few KiB at most).
DEFAULT_MAX_JSON_KB = 1024
#: room for the non-file form fields and part headers of a multipart upload.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def _error_bytes(code: str, message: str, hint: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "hint": hint}}).encode()


@dataclass
class BodyLimits:
    """Caps in bytes: ``json_limit`` for every route but ``upload_paths`` (exact paths, e.g. ``/v1/segment``),
    which take ``upload_limit`` (the file cap) plus :data:`MULTIPART_OVERHEAD_BYTES`. Mutable, so that the app's
    settings can configure a middleware that the module-level FastAPI app already holds."""

    json_limit: int = DEFAULT_MAX_JSON_KB * 1024
    upload_limit: int = 512 * 2**20
    upload_paths: frozenset[str] = frozenset()

    def limit_for(self, path: str) -> int:
        if path.rstrip("/") in self.upload_paths:
            return self.upload_limit + MULTIPART_OVERHEAD_BYTES
        return self.json_limit


#: the caps of this process (one Serve replica = one process), set by :func:`configure`.
ACTIVE = BodyLimits()


def configure(*, json_limit: int, upload_limit: int, upload_paths: frozenset[str]) -> BodyLimits:
    """Set this process's caps (the Gateway calls it with its settings). A module-level object, not one held
    by the app: Serve pickles the app by value, and the replica must change the caps the middleware reads."""
    ACTIVE.json_limit, ACTIVE.upload_limit, ACTIVE.upload_paths = int(json_limit), int(upload_limit), upload_paths
    return ACTIVE


class BodyLimit:
    """ASGI middleware capping request bodies per route (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        limits: the caps, read on every request (default: this process's :data:`ACTIVE`).
    """

    def __init__(self, app: ASGIApp, limits: BodyLimits | None = None) -> None:
        self.app = app
        self._limits = limits

    @property
    def limits(self) -> BodyLimits:
        return self._limits if self._limits is not None else ACTIVE

    @staticmethod
    async def _refuse(send: Send, status: int, code: str, message: str, hint: str) -> None:
        body = _error_bytes(code, message, hint)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.limit_for(scope.get("path", ""))
        hint = ("for volumes: use POST /v1/segment (up to the upload limit) or POST /v1/vista3d/inference with an "
                "image URI" if limit == self.limits.json_limit else "send a smaller (e.g. gzip-compressed) volume, or "
                "POST /v1/jobs with an object-storage URI")
        declared = [v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"]
        if declared:
            try:
                length = int(declared[0])
                if length < 0:
                    raise ValueError
            except ValueError:
                await self._refuse(send, 400, "invalid_request", "the Content-Length header is not a byte count",
                                   "send a valid Content-Length, or a chunked body")
                return
            if length > limit:
                err = PayloadTooLarge(f"the request body of {length} bytes exceeds this route's limit of {limit} bytes")
                await self._refuse(send, 413, err.code, err.message, hint)
                return

        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        err = PayloadTooLarge(f"the request body exceeds this route's limit of {limit} bytes")
                        await self._refuse(send, 413, err.code, err.message, hint)
                    return {"type": "http.disconnect"}  # the app stops reading; its own response is dropped
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the app failed on the cut-off body (ClientDisconnect, ...): the 413 is already sent
