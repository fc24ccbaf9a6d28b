"""Bearer tokens, request body limits and content types, enforced before any route runs.

A pure ASGI middleware, so a request without a valid token is refused (401) before its body is read,
parsed or acted on; the owner id of the token is put in ``request.state.owner`` for the routes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from fastapi import HTTPException

from .config import API_PREFIX, ServerConfig

OPEN_PATHS = {f"{API_PREFIX}/health"}
BODY_METHODS = {"POST", "PUT", "PATCH"}
DRAIN_BYTES = 64 * 1024 * 1024  # a refused request's body is read (and dropped) up to this much, so the
# client hears the refusal instead of a connection reset in the middle of its upload
VOLUME_PATH = re.compile(rf"^{API_PREFIX}/sessions/?$")
MASK_PATH = re.compile(rf"^{API_PREFIX}/sessions/[^/]+/masks/[^/]+/?$")


class BodyTooLarge(HTTPException):
    """Raised while reading a body that grows past its limit (also when no Content-Length was sent)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than this endpoint's limit of {limit} bytes")


def body_rules(config: ServerConfig) -> Callable[[str, str], tuple[int, str]]:
    """(method, path) -> (byte limit, expected content type) of a request body."""
    volume_limit = config.max_voxels * 4 + 1024
    mask_limit = config.max_voxels + 1024

    def rules(method: str, path: str) -> tuple[int, str]:
        if method == "POST" and VOLUME_PATH.match(path):
            return volume_limit, "application/octet-stream"
        if method == "PUT" and MASK_PATH.match(path):
            return mask_limit, "application/octet-stream"
        return config.max_json_bytes, "application/json"

    return rules


class SecurityMiddleware:
    def __init__(self, app, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self.rules = body_rules(config)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope["path"], scope["method"]
        if path not in OPEN_PATHS:
            owner = self._owner(headers.get("authorization", ""))
            if owner is None:
                detail = ("missing token: send 'Authorization: Bearer <token>' (the token liversam serve printed "
                          "or wrote to its token file)") if "authorization" not in headers else "invalid token"
                await _drain(receive, headers)
                await _send_error(send, 401, detail, {"www-authenticate": "Bearer"})
                return
            scope.setdefault("state", {})["owner"] = owner
        if method in BODY_METHODS:
            limit, expected = self.rules(method, path)
            length = headers.get("content-length")
            try:
                declared = int(length) if length is not None else None
            except ValueError:
                await _send_error(send, 400, f"invalid Content-Length header '{length}'")
                return
            if declared is not None and declared > limit:
                await _drain(receive, headers)
                await _send_error(send, 413, f"request body of {declared} bytes is larger than this endpoint's "
                                             f"limit of {limit} bytes")
                return
            has_body = declared != 0 if declared is not None else "transfer-encoding" in headers
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if has_body and content_type != expected:
                await _drain(receive, headers)
                await _send_error(send, 415, f"content type '{content_type or '(none)'}' is not accepted here; "
                                             f"send '{expected}'")
                return
            receive = _limited(receive, limit)
        await self.app(scope, receive, send)

    def _owner(self, authorization: str) -> str | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.config.owner_of(token.strip())


def _limited(receive, limit: int):
    received = 0

    async def wrapped():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped


async def _drain(receive, headers: dict[str, str]) -> None:
    """Read and drop a request body we refuse (up to :data:`DRAIN_BYTES`)."""
    try:
        declared = int(headers.get("content-length", "0"))
    except ValueError:
        return
    if declared <= 0 and "transfer-encoding" not in headers:
        return
    received = 0
    while received <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_error(send, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
