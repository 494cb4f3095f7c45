"""Draining the router: no new generation requests, the ones in flight run to their end.

`DrainState` counts generation requests from their arrival until their response is sent
(streamed ones included). `DrainGate`, a plain ASGI middleware in front of everything, keeps
that count and, once `start()` was called, answers new generation requests with 503 and
Retry-After (OpenAI's error body), so a load balancer or client retries elsewhere. /ready reads
`draining` and turns false. Probes, /metrics and /v1/models keep answering while draining.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.router.openai_api import ApiError

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
RETRY_AFTER_S = 5  # a replacement replica (or this one restarted) is the client's best bet


class DrainState:
    """Generation requests in flight, and whether new ones are still taken.

    Lives on the router's event loop (the gate and the server's drain call both run there)."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        """Refuse new generation requests from now on."""
        self.draining = True

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no generation request is in flight; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True


class DrainGate:
    """Counts generation requests into `state`; refuses them with 503 once it drains."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self._app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self._app(scope, receive, send)
            return
        if self._state.draining:
            error = ApiError(
                503,
                "the server is shutting down and takes no new requests; retry on another "
                "replica or after it restarted",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
            await error.response()(scope, receive, send)
            return
        self._state.enter()
        try:
            await self._app(scope, receive, send)
        finally:
            self._state.leave()
