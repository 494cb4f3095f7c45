"""The router as a Ray actor: a plain class the launcher wraps with `ray.remote`.

The constructor does no I/O. `start()` loads the tokenizer, binds the token inbox on the cluster
address, and runs uvicorn on its own thread (see server.py); Ray calls stay control-plane only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.config import PdserveConfig
from cluster.router.app import HealthCheck, InstanceStats, create_app, deployment_info
from cluster.router.dispatcher import Dispatcher, InstanceEndpoint
from cluster.router.drain import DrainState
from cluster.router.server import RouterServer
from engine.procinfo import rss_mb
from engine.protocol.channels import node_ip_address
from engine.protocol.identity import InstanceId
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_HEALTH_TIMEOUT_S = 5.0


class RouterActor:
    """HTTP front end of a deployment.

    config: the `PdserveConfig` as a dict; model_path: the model folder (for its tokenizer);
    host: the cluster address to bind the token inbox on; max_model_len: the context length.
    """

    def __init__(self, config: dict, model_path: str, host: str, max_model_len: int) -> None:
        self.config = PdserveConfig.model_validate(config)
        self._model_path = str(model_path)
        self._host = host or node_ip_address()  # the node this actor landed on
        self._max_model_len = int(max_model_len)
        self._server: RouterServer | None = None
        self.url: str | None = None
        # The actors /health asks and /metrics reads; `watch` changes them in place.
        self._watched: list[Any] = []

    def start(
        self,
        endpoints: Sequence[dict],
        health_actor_handles: Sequence[Any] = (),
        health_method: str = "is_ready",
        timeout_s: float = 60.0,
    ) -> str:
        """Serve HTTP; returns the base URL (with the real port when the config says 0).

        endpoints: `{"name", "role", "inbox"}` dicts, as instance actors' setup() returns them.
        health_actor_handles: instance actor handles; /health calls `health_method` on each and
        is 200 only when every one returns true.
        """
        if self._server is not None:
            raise RuntimeError("the router is already started")
        router = self.config.router
        tokenizer = Tokenizer.from_folder(self._model_path)
        dispatcher = Dispatcher(
            [InstanceEndpoint.from_dict(e) for e in endpoints], self._host, router, self.config.slo
        )
        self._watched[:] = health_actor_handles
        health = _ray_health_check(self._watched, health_method) if health_actor_handles else None
        drain = DrainState()
        model_name = Path(self._model_path).name
        app = create_app(
            dispatcher,
            tokenizer,
            max_model_len=self._max_model_len,
            model_name=model_name,
            config=router,
            health=health,
            instance_stats=_ray_stats(self._watched),
            drain=drain,
            deployment=deployment_info(self.config, model_name),
        )
        server = RouterServer(app, dispatcher, router.host, router.port, drain)
        self.url = server.start(timeout_s, advertise_host=self._host)
        self._server = server
        log.info("router serving on %s (token inbox %s)", self.url, self._host)
        return self.url

    def drain(self, timeout_s: float) -> dict:
        """Turn new generation requests away (503, /ready false) and wait up to `timeout_s`
        for those in flight to finish. Returns {"inflight": requests still running}."""
        server = self._require_server()
        return {"inflight": server.drain(timeout_s)}

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Stop serving; requests in flight end with an error naming `reason` and are aborted
        on every instance."""
        if self._server is not None:
            self._server.stop(reason=reason)
            self._server = None

    def stats(self) -> dict:
        """In-flight requests, outstanding prefill tokens per instance, bad frames, and more."""
        server = self._server
        if server is None or not server.running:
            return {"running": False}

        async def snapshot() -> dict:
            return server.dispatcher.stats()

        return {"running": True, "url": self.url, "rss_mb": rss_mb(), **server.call(snapshot)}

    def reset_timings(self) -> None:
        """Forget the TTFT split collected so far (benchmarks call this after warm-up)."""
        server = self._server
        if server is not None and server.running:

            async def reset() -> None:
                server.dispatcher.timing_split.clear()

            server.call(reset)

    def instance_down(self, name: InstanceId) -> dict:
        """An instance died (the supervisor says so): retry or fail what it held."""
        server = self._require_server()

        async def down() -> dict:
            return server.dispatcher.instance_down(name)

        return server.call(down)

    def watch(self, handles: Sequence[Any]) -> None:
        """The actors /health and /metrics cover from now on (the elastic controller added or
        removed an instance)."""
        self._watched[:] = handles

    def update_endpoints(self, endpoints: Sequence[dict]) -> None:
        """Instances restarted with new inboxes: use them, and choose them again."""
        server = self._require_server()
        parsed = [InstanceEndpoint.from_dict(e) for e in endpoints]

        async def update() -> None:
            server.dispatcher.update_endpoints(parsed)

        server.call(update)

    def _require_server(self) -> RouterServer:
        if self._server is None or not self._server.running:
            raise RuntimeError("the router is not serving")
        return self._server

    def ready(self) -> bool:
        return self._server is not None and self._server.running


def _ray_stats(handles: list[Any]) -> InstanceStats:
    async def every_instance_stats() -> list[dict]:
        async def one(handle: Any) -> dict:
            try:
                return await asyncio.wait_for(
                    asyncio.wrap_future(handle.stats.remote().future()), _HEALTH_TIMEOUT_S
                )
            except Exception as exc:  # a dead or stalled instance: no series for it
                return {"name": "?", "error": type(exc).__name__}

        return list(await asyncio.gather(*(one(h) for h in handles)))

    return every_instance_stats


def _ray_health_check(handles: list[Any], method: str) -> HealthCheck:
    async def every_instance_ready() -> bool:
        refs = [getattr(handle, method).remote() for handle in handles]
        # ObjectRef.future() is a concurrent future, so this works on any event loop.
        results = await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(ref.future()) for ref in refs)),
            _HEALTH_TIMEOUT_S,
        )
        return all(bool(r) for r in results)

    return every_instance_ready
