"""The gate in front of every route: the API key, requests per client and the body size limit.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which would wrap streaming
responses and hide client disconnects). It checks the key before the body is read, so a wrong
key is a 401 whatever the body, and it reads the body itself, bounded, so an oversized one is a
413 without buffering more than the limit.

A client (its Authorization header, else its address) may have `max_requests_per_client`
generation requests in flight; one more is a 429 with Retry-After. A request counts from its
arrival until its response is sent, streamed ones included, since the middleware wraps the
whole exchange.
"""

from __future__ import annotations

import hmac
import json
from collections import defaultdict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.router.openai_api import ApiError

_PROTECTED_PREFIX = "/v1/"
_RATE_LIMITED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_RETRY_AFTER_S = "1"


class GateMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        max_requests_per_client: int = 0,
    ) -> None:
        self._app = app
        self._api_key = api_key
        self._max_body_bytes = max_body_bytes
        self._max_per_client = max_requests_per_client
        self._inflight: defaultdict[str, int] = defaultdict(int)  # client -> requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if (
            self._api_key
            and scope["path"].startswith(_PROTECTED_PREFIX)
            and not self._authorized(scope)
        ):
            error = ApiError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key",
            )
            await _send_error(send, error)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self._app(scope, receive, send)
            return
        client = self._client_key(scope)
        if client is None:
            await self._read_and_call(scope, receive, send)
            return
        if self._inflight[client] >= self._max_per_client:
            error = ApiError(
                429,
                f"this client has {self._max_per_client} requests in flight already, the "
                "most allowed; retry when one has finished",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": _RETRY_AFTER_S},
            )
            await _send_error(send, error)
            return
        self._inflight[client] += 1
        try:
            await self._read_and_call(scope, receive, send)
        finally:
            self._inflight[client] -= 1
            if not self._inflight[client]:
                del self._inflight[client]

    def _client_key(self, scope: Scope) -> str | None:
        """Who the per-client limit counts this request against; None when it does not apply."""
        if not self._max_per_client or scope["path"] not in _RATE_LIMITED_PATHS:
            return None
        authorization = dict(scope["headers"]).get(b"authorization")
        if authorization:
            return "key:" + authorization.decode("latin-1")
        client = scope.get("client")
        return f"address:{client[0] if client else 'unknown'}"

    async def _read_and_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(scope, receive)
        if body is None:
            error = ApiError(
                413, f"the request body exceeds {self._max_body_bytes} bytes", code="body_too_large"
            )
            await _send_error(send, error)
            return
        await self._app(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        # Constant-time comparison: the key must not leak through response timing.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(),
            self._api_key.encode(),  # type: ignore[union-attr]
        )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it is known to exceed the limit."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the buffered body once, then the client's later messages
    (a disconnect), so routes can still watch for the client going away."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send: Send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    for name, value in (error.headers or {}).items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
