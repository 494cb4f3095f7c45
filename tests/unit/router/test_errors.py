"""Every error a client can get, checked with raw httpx: status, OpenAI body shape, param."""

from __future__ import annotations

import pytest

from engine.config import Role
from tests.unit.router.fakes import FakeInstance
from tests.unit.router.harness import RouterStarter

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def router(byte_tokenizer, script):
    """One router for the module: errors end before anything reaches an instance."""
    starter = RouterStarter(byte_tokenizer)
    decode = FakeInstance("decode", Role.DECODE, script)
    prefill = FakeInstance("prefill", Role.PREFILL, script, decode_peer=decode)
    yield starter([prefill, decode], max_model_len=64, max_body_bytes=1024)
    starter.close()


@pytest.fixture
def http(router):
    sent_before = len(router.fakes[0].received)
    with router.http() as client:
        client.sent_before = sent_before
        yield client
    router.assert_no_leaks()


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
        (COMPLETIONS, {"prompt": "x", "n": 9}, "n"),  # router.max_n is 8
        (CHAT, {"messages": USER, "n": "two"}, "n"),
        (COMPLETIONS, {"prompt": "x", "best_of_all": 1}, "best_of_all"),
        (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature"),
        (COMPLETIONS, {"prompt": "x", "temperature": -1}, "temperature"),
        (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, "top_p"),
        (COMPLETIONS, {"prompt": "x", "top_k": -5}, "top_k"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"prompt": "x", "stop": [1, 2]}, "stop"),
        (COMPLETIONS, {"prompt": "x", "stop": ["a"] * 17}, "stop"),
        (COMPLETIONS, {"prompt": "x", "logprobs": 6}, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "logprobs": -1}, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "logprobs": "many"}, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        (COMPLETIONS, {"prompt": "x", "presence_penalty": "x"}, "presence_penalty"),
        (COMPLETIONS, {"prompt": "x", "frequency_penalty": -2.01}, "frequency_penalty"),
        (CHAT, {"messages": USER, "frequency_penalty": 3}, "frequency_penalty"),
        (CHAT, {"messages": USER, "presence_penalty": -7}, "presence_penalty"),
        (CHAT, {"messages": USER, "logprobs": "maybe"}, "logprobs"),
        (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (CHAT, {"messages": USER, "top_logprobs": 3}, "top_logprobs"),
        (
            CHAT,
            {"messages": USER, "max_tokens": 3, "max_completion_tokens": 4},
            "max_completion_tokens",
        ),
        (COMPLETIONS, {"prompt": "x", "seed": 2**70}, "seed"),
        (COMPLETIONS, {"prompt": "x", "top_k": 2**40}, "top_k"),
        (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
        (
            COMPLETIONS,
            {"prompt": "x", "stream_options": {"include_usage": 1, "x": 1}},
            "stream_options.x",
        ),
        (COMPLETIONS, {"prompt": ""}, "prompt"),
        (COMPLETIONS, {"prompt": ["one", "two"]}, "prompt"),
        (COMPLETIONS, {"prompt": [1, 100000]}, "prompt"),
        (COMPLETIONS, {"max_tokens": 3}, "prompt"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
        (CHAT, {"messages": USER, "n": 100}, "n"),
        (CHAT, {"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens"),
        (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
        (CHAT, {"messages": USER, "seed": "abc"}, "seed"),
    ],
)
def test_invalid_parameters_are_400_naming_them(router, http, path, body, param) -> None:
    error = _error(http.post(path, json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in error["message"]
    assert len(router.fakes[0].received) == http.sent_before, "an invalid request was sent"


def test_malformed_json_and_non_object_bodies(http) -> None:
    malformed = http.post(
        COMPLETIONS, content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in _error(malformed, 400)["message"]
    assert "JSON object" in _error(http.post(CHAT, json=[1, 2]), 400)["message"]
    assert "JSON object" in _error(http.post(CHAT), 400)["message"]


def test_unknown_model_is_404(http) -> None:
    error = _error(http.post(CHAT, json={"model": "gpt-9", "messages": USER}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert (
        http.post(CHAT, json={"model": "tiny", "messages": USER, "max_tokens": 1}).status_code
        == 200
    )


def test_context_length_is_413(http) -> None:
    # max_model_len is 64; "x" is 2 tokens with BOS.
    error = _error(http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 63}), 413)
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 62}).status_code == 200
    error = _error(http.post(COMPLETIONS, json={"prompt": "y" * 70}), 413)
    assert error["param"] == "prompt"
    long_chat = [{"role": "user", "content": "z" * 70}]
    assert _error(http.post(CHAT, json={"messages": long_chat}), 413)["param"] == "messages"


def test_body_too_large_is_413(http) -> None:
    error = _error(http.post(COMPLETIONS, json={"prompt": "x" * 2000}), 413)
    assert error["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        yield b"x" * 2000
        yield b'"}'

    response = http.post(
        COMPLETIONS, content=chunked(), headers={"content-type": "application/json"}
    )
    assert _error(response, 413)["code"] == "body_too_large"


def test_unknown_route_and_method(http) -> None:
    assert _error(http.get("/v1/nothing"), 404)["type"] == "invalid_request_error"
    assert _error(http.get(COMPLETIONS), 405)["message"]


def test_api_key(start_router, pd_pair) -> None:
    router = start_router(pd_pair(), api_key="s3cret")
    with router.http() as http:
        error = _error(http.post(COMPLETIONS, json={"prompt": "x"}), 401)
        assert error["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        _error(http.post(COMPLETIONS, json={"prompt": "x"}, headers=wrong), 401)
        # The key is checked before the body: a bad body with a bad key is still a 401.
        _error(http.post(COMPLETIONS, content=b"{", headers=wrong), 401)
        _error(http.get("/v1/models"), 401)
        assert http.get("/health").status_code == 200  # probes carry no key
    result = router.openai(api_key="s3cret").completions.create(
        model="tiny", prompt="x", max_tokens=3
    )
    assert result.choices[0].finish_reason == "length"
    router.assert_no_leaks()
