"""Schemathesis against the router's own OpenAPI schema: valid and invalid requests on every
route, in-process (ASGI) in front of a fake instance. No 5xx, and every 4xx is OpenAI's error
body."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import RouterConfig
from cluster.router.app import create_app
from cluster.router.dispatcher import Dispatcher
from engine.config import Role
from tests.unit.router.fakes import FakeInstance

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.python import asgi as schemathesis_asgi  # noqa: E402

_ERROR_FIELDS = {"message", "type", "param", "code"}


def _app_with_dispatcher(dispatcher: Dispatcher, app):
    """The dispatcher's sockets live on the loop that serves requests: schemathesis runs every
    request of an app on one loop, and starts the app's lifespan on it first."""

    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        await dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.close()

    app.router.lifespan_context = lifespan
    return app


def test_no_server_errors_and_openai_error_bodies(byte_tokenizer, script) -> None:
    # One step produces a whole (short) answer, so a case takes milliseconds.
    fake = FakeInstance("mixed", Role.MIXED, script, step_s=0.001, tokens_per_step=256).start()
    config = RouterConfig(model_name="tiny", max_n=3, max_body_bytes=8192)
    dispatcher = Dispatcher([fake.as_endpoint()], "127.0.0.1", config)
    app = create_app(
        dispatcher, byte_tokenizer, max_model_len=256, model_name="tiny", config=config
    )
    try:
        schema = schemathesis.openapi.from_asgi(
            "/openapi.json", _app_with_dispatcher(dispatcher, app)
        )
        operations = [result.ok() for result in schema.get_all_operations()]
        paths = {(op.method.upper(), op.path) for op in operations}
        assert {
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/ready"),
            ("GET", "/version"),
        } <= paths
        strategy = st.one_of(
            *(
                op.as_strategy(generation_mode=mode)
                for op in operations
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            )
        )
        _fuzz(strategy)
    finally:
        schemathesis_asgi.shutdown_lifespans()
        fake.stop()


def _fuzz(strategy: st.SearchStrategy) -> None:
    statuses: list[int] = []

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case) -> None:
        response = case.call()
        statuses.append(response.status_code)
        where = f"{case.method} {case.path} {case.body!r}"
        assert response.status_code < 500, f"{where} -> {response.status_code} {response.text}"
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and set(body["error"]) == _ERROR_FIELDS, where
            assert body["error"]["message"], where

    check()
    # Both kinds of outcome were exercised, or the run proved little.
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses), statuses
