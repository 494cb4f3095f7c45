"""uvicorn and the dispatcher on a dedicated thread with its own event loop.

The Ray actor's methods run on Ray's thread; HTTP and token traffic must not wait on them, so
everything the router does per request lives on this one loop. The dispatcher's zmq sockets are
created on it (in `Dispatcher.start`) and are only ever touched from it.

Shutting down: `drain()` turns new generation requests away and waits for those in flight;
`stop()` ends whatever is still in flight with an error (a stream gets an error event, never a
cut connection) before uvicorn stops, so its graceful shutdown never has to cancel a response.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvicorn
from starlette.types import ASGIApp

from cluster.preflight import listen_socket
from cluster.router.dispatcher import Dispatcher
from cluster.router.drain import DrainState

log = logging.getLogger(__name__)
T = TypeVar("T")
_GRACEFUL_SHUTDOWN_S = 5  # open streams get this long before uvicorn cuts them
_END_REQUESTS_S = 5.0  # after requests were failed at stop, time to send their last events
_CALL_MARGIN_S = 5.0


class _Server(uvicorn.Server):
    """A uvicorn server that signals when it is listening, instead of being polled."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_done = threading.Event()

    async def startup(self, sockets: list | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.startup_done.set()


class RouterServer:
    """Serves `app` on host:port (0: a free port) next to a dispatcher, in a background thread."""

    def __init__(
        self,
        app: ASGIApp,
        dispatcher: Dispatcher,
        host: str,
        port: int,
        drain: DrainState | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self._drain = drain or DrainState()  # the app's, so stop() knows when responses ended
        self._host = host
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        self._server = _Server(config)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.port: int | None = None

    def start(self, timeout_s: float = 30.0, advertise_host: str | None = None) -> str:
        """Start serving; returns the base URL once uvicorn listens. `advertise_host` replaces a
        wildcard bind address (0.0.0.0, ::) in the URL."""
        assert self._thread is None, "started twice"
        # Bound here, not by uvicorn: a port in use is a one-line PdserveError for the caller
        # instead of uvicorn's SystemExit inside the thread.
        sock = listen_socket(self._server.config.host, self._server.config.port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name="router-http", daemon=True
        )
        self._thread.start()
        if not self._server.startup_done.wait(timeout_s) or not self._server.started:
            self.stop()
            detail = f": {self._error!r}" if self._error else ""
            raise RuntimeError(f"router did not start listening within {timeout_s:g} s{detail}")
        sockname = self._server.servers[0].sockets[0].getsockname()
        self.port = int(sockname[1])
        host = self._host
        if host in ("0.0.0.0", "::", "") and advertise_host:
            host = advertise_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def drain(self, timeout_s: float) -> int:
        """Take no new generation requests; wait up to `timeout_s` for those in flight to end.
        Returns how many are still in flight."""

        async def run() -> int:
            self._drain.start()
            await self._drain.wait_idle(timeout_s)
            return self._drain.active

        return self.call(run, timeout_s + _CALL_MARGIN_S)

    def stop(self, timeout_s: float = 15.0, reason: str = "the server is shutting down") -> None:
        """Stop accepting requests, end the ones in flight with an error naming `reason` (and
        abort them on every instance), close the sockets."""
        if self.running:
            try:
                self.call(lambda: self._end_requests(reason), _END_REQUESTS_S + _CALL_MARGIN_S)
            except Exception as exc:  # a stuck loop: uvicorn's own shutdown still bounds it
                log.warning("router: requests in flight not ended before stopping: %r", exc)
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("router thread did not stop within %s s", timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], Awaitable[T]], timeout_s: float = 10.0) -> T:
        """Run `fn()` on the server's loop (where the dispatcher lives) and return its result."""
        assert self._loop is not None and self.running, "not running"

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    async def _end_requests(self, reason: str) -> None:
        self._drain.start()
        if self.dispatcher.fail_inflight(reason):
            await self._drain.wait_idle(_END_REQUESTS_S)

    def _run(self, sock: socket.socket) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(sock))
        except BaseException as exc:  # SystemExit from a failed uvicorn startup included
            self._error = exc
            log.error("router server stopped with an error: %r", exc)
        finally:
            self._server.startup_done.set()  # never leave start() waiting for its deadline
            sock.close()  # uvicorn closed it unless it failed before listening
            _close_loop(self._loop)

    async def _serve(self, sock: socket.socket) -> None:
        await self.dispatcher.start()
        try:
            await self._server.serve(sockets=[sock])
        finally:
            await self.dispatcher.close()


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left (streams cut at shutdown), finalize async generators, close."""
    leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
