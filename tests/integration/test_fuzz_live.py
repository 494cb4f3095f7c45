"""Fuzzing a live 1P1D cluster (real model, real NIXL, real HTTP) through its router.

Two phases: valid generation bodies drawn by hypothesis over every sampling parameter (each is
served: 200, or 413 when the drawn prompt is over the context), then schemathesis from the
router's own OpenAPI schema, valid and invalid requests on every route. No 5xx, no error event
in a 200 stream, every 4xx in OpenAI's error shape; afterwards every KV block is free, nothing is
tracked, no instance counted a failure, and a normal request gives the single engine's answer.

The in-process variant with a fake instance is tests/unit/router/test_schema.py; this one shows
that what the router lets through is served by the instances and leaves them clean."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MAX_TOKENS
from tests.integration.harness import (
    assert_all_free,
    complete,
    failures_in,
    model_id,
    prompts,
    small_config,
    start,
)

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

pytestmark = pytest.mark.timeout(180)

EXAMPLES = 30  # per phase
# Most tokens per request: the fuzz is about inputs, not output length, and CI runs on 2 cores.
TOKEN_CAP = 4
CONTEXT = 512
_GENERATING = ("/v1/completions", "/v1/chat/completions")
_ERROR_FIELDS = {"message", "type", "param", "code"}
_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def dep():
    # A short context: a prompt plus max_tokens over it is a 413 at the router, never a request
    # that no decode instance's cache can hold (a 503, tested in test_faults.py), even at n=3.
    scheduler = {"scheduler": {"max_model_len": CONTEXT}}
    deployment = start(
        small_config(
            router={"max_n": 3, "max_body_bytes": 16384},
            prefill={"engine": scheduler},
            decode={"engine": scheduler},
        )
    )
    yield deployment
    deployment.stop()


def test_fuzzed_requests_get_no_5xx_and_leave_every_instance_clean(dep, reference_outputs):
    model = httpx.get(f"{dep.url}/v1/models", timeout=10).json()["data"][0]["id"]
    before = _instance_requests(dep)

    valid = _send_valid_bodies(dep.url, model)
    assert valid.count(200) >= EXAMPLES * 2 // 3, valid  # most drawn prompts fit the context
    assert set(valid) <= {200, 413}, valid
    anything = _schemathesis(dep.url)
    assert any(400 <= status < 500 for _, status in anything), anything

    stats = assert_all_free(dep)
    assert _instance_requests(dep) - before >= valid.count(200)
    assert not failures_in(stats), failures_in(stats)
    assert httpx.get(f"{dep.url}/health", timeout=10).status_code == 200
    _assert_normal_requests_still_right(dep.url, reference_outputs)


# ---------------------------------------------------------------- phase 1: valid bodies
def _text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8"), min_size=min_size, max_size=max_size)


def _sampling(model: str) -> dict[str, st.SearchStrategy]:
    return {
        "model": st.just(model),
        "temperature": st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
        "top_p": st.floats(0.05, 1.0),
        "top_k": st.integers(-1, 200),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.one_of(_text(8, 1), st.lists(_text(8, 1), max_size=4)),
        "ignore_eos": st.booleans(),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.integers(1, 3),
        "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "user": _text(16),
    }


def _completion(model: str) -> st.SearchStrategy[tuple[str, dict]]:
    token_ids = st.lists(st.integers(0, 10_000), min_size=1, max_size=48)
    prompt = st.one_of(
        _text(80, 1), token_ids, _text(80, 1).map(lambda p: [p]), token_ids.map(lambda p: [p])
    )
    fields = {**_sampling(model), "logprobs": st.integers(0, 5)}
    required = {"prompt": prompt, "max_tokens": st.integers(1, TOKEN_CAP)}
    body = st.fixed_dictionaries(required, optional=fields)
    return body.map(lambda b: ("/v1/completions", b))


def _chat(model: str) -> st.SearchStrategy[tuple[str, dict]]:
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text(30)}))
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant"]),
            "content": st.one_of(_text(60), parts),
        },
        optional={"name": _text(8)},
    )
    fields = {**_sampling(model), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)}
    limit = st.sampled_from(["max_tokens", "max_completion_tokens"])
    required = {
        "messages": st.lists(message, min_size=1, max_size=3),
        # Always a limit: without one, chat generates up to the whole context.
        "limit": st.tuples(limit, st.integers(1, TOKEN_CAP)),
    }
    body = st.fixed_dictionaries(required, optional=fields).map(_chat_body)
    return body.map(lambda b: ("/v1/chat/completions", b))


def _chat_body(drawn: dict) -> dict:
    name, value = drawn.pop("limit")
    drawn[name] = value
    if not drawn.get("logprobs"):  # top_logprobs without logprobs is a 400
        drawn.pop("top_logprobs", None)
    return drawn


def _send_valid_bodies(url: str, model: str) -> list[int]:
    statuses: list[int] = []

    @_SETTINGS
    @given(request=st.one_of(_completion(model), _chat(model)))
    def check(request: tuple[str, dict]) -> None:
        path, body = request
        response = client.post(path, json=body)
        statuses.append(response.status_code)
        _check("POST", path, body, response.status_code, response.text)

    with httpx.Client(base_url=url, timeout=30) as client:
        check()
    return statuses


# ---------------------------------------------------------------- phase 2: the schema, any route
def _schemathesis(url: str) -> list[tuple[str, int]]:
    import requests

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations if op.method.upper() == "POST"} >= set(_GENERATING)
    cases = st.one_of(
        *(
            op.as_strategy(generation_mode=mode)
            for op in operations
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        )
    )
    outcomes: list[tuple[str, int]] = []

    @_SETTINGS
    @given(case=cases)
    def check(case) -> None:
        if case.path in _GENERATING and isinstance(case.body, dict):
            _bound_generation(case.body)
        response = case.call(base_url=url, session=session, timeout=30)
        outcomes.append((case.path, response.status_code))
        _check(case.method, case.path, case.body, response.status_code, response.text)

    with requests.Session() as session:
        check()
    return outcomes


def _bound_generation(body: dict[str, Any]) -> None:
    """Few tokens per request: the chat default is the whole context."""
    limits = [k for k in ("max_tokens", "max_completion_tokens") if _is_int(body.get(k))]
    for key in limits:
        body[key] = min(body[key], TOKEN_CAP)
    if not limits and body.get("max_tokens") is body.get("max_completion_tokens") is None:
        body["max_tokens"] = TOKEN_CAP


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- checks
def _check(method: str, path: str, body: Any, status: int, text: str) -> None:
    """No 5xx; a 4xx is OpenAI's error body; a 200 from a generation route is a whole answer
    (JSON with choices, or SSE events without an error event, ending with [DONE])."""
    where = f"{method} {path} {body!r} -> {status} {text[:500]}"
    assert status < 500, where
    if status >= 400:
        error = json.loads(text)
        assert set(error) == {"error"} and set(error["error"]) == _ERROR_FIELDS, where
        assert error["error"]["message"], where
    if status != 200 or path not in _GENERATING:
        return
    if not text.startswith("data: "):
        assert json.loads(text)["choices"], where
        return
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", where
    for event in events[:-1]:
        assert "error" not in json.loads(event), where


def _instance_requests(dep) -> int:
    return sum(s.get("counters", {}).get("requests", 0) for s in dep.stats().values())


def _assert_normal_requests_still_right(url: str, reference_outputs: dict[str, str]) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            model = await model_id(client)
            for stream, prompt in enumerate(prompts()[:2]):
                text = await complete(client, model, prompt, MAX_TOKENS, stream=bool(stream))
                assert text == reference_outputs[prompt], prompt

    asyncio.run(main())
