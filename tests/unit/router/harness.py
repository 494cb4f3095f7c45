"""A real router (uvicorn on 127.0.0.1:0, its own thread) in front of fake instances."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from cluster.config import RouterConfig
from cluster.router.app import HealthCheck, create_app
from cluster.router.dispatcher import Dispatcher
from cluster.router.drain import DrainState
from cluster.router.server import RouterServer
from engine.tokenizer import Tokenizer
from tests.unit.router.fakes import FakeInstance

MODEL = "tiny"


@dataclass
class RouterHarness:
    url: str
    server: RouterServer
    fakes: list[FakeInstance]

    @property
    def dispatcher(self) -> Dispatcher:
        return self.server.dispatcher

    def openai(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=20)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=20, **kwargs)

    def stats(self) -> dict:
        async def snapshot() -> dict:
            return self.dispatcher.stats()

        return self.server.call(snapshot)

    def wait_idle(self, timeout_s: float = 5.0) -> dict:
        """Stats once no request is in flight and every abort went out (or the deadline)."""
        dispatcher = self.dispatcher

        async def settle() -> dict:
            deadline = time.monotonic() + timeout_s
            # A stream is released just after its last chunk went out, so give it a moment.
            while dispatcher.num_inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await dispatcher.wait_background()
            return dispatcher.stats()

        return self.server.call(settle, timeout_s + 5)

    def assert_no_leaks(self) -> None:
        stats = self.wait_idle()
        assert stats["inflight_requests"] == 0, stats
        assert set(stats["outstanding_prefill_tokens"].values()) <= {0}, stats


class RouterStarter:
    """Starts fakes and routers in front of them; `close()` stops everything it started."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._harnesses: list[RouterHarness] = []

    def __call__(
        self,
        fakes: list[FakeInstance],
        *,
        max_model_len: int = 256,
        health: HealthCheck | None = None,
        **router_options: Any,
    ) -> RouterHarness:
        options = {"host": "127.0.0.1", "port": 0, "model_name": MODEL, **router_options}
        config = RouterConfig(**options)
        for fake in fakes:
            fake.start()
        dispatcher = Dispatcher([f.as_endpoint() for f in fakes], "127.0.0.1", config)
        drain = DrainState()
        app = create_app(
            dispatcher,
            self._tokenizer,
            max_model_len=max_model_len,
            model_name="folder-name",
            config=config,
            health=health,
            drain=drain,
        )
        server = RouterServer(app, dispatcher, config.host, config.port, drain)
        harness = RouterHarness(server.start(timeout_s=10), server, fakes)
        self._harnesses.append(harness)
        return harness

    def close(self) -> None:
        for harness in self._harnesses:
            harness.server.stop()
            for fake in harness.fakes:
                fake.stop()
