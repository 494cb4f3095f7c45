"""Request models, error mapping and response shapes, without a server."""

from __future__ import annotations

import json

import pytest

from cluster.router.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    _param_name,
)
from cluster.router.responses import SSE_DONE, ChatShape, CompletionShape, Usage, sse
from engine.sampling_params import SamplingParamsError


@pytest.mark.parametrize(
    ("loc", "name"),
    [
        (("body", "n"), "n"),
        (("body", "messages", 0, "content", "str"), "messages[0].content"),
        (("body", "stop", "list[str]", 0), "stop"),
        (("body", "stream_options", "include_usage"), "stream_options.include_usage"),
        (("body",), None),
    ],
)
def test_param_names_from_pydantic_locations(loc: tuple, name: str | None) -> None:
    assert _param_name(loc) == name


def test_sampling_params_from_a_request() -> None:
    body = CompletionRequest(prompt="x", temperature=0, top_k=5, seed=7, stop="END",
                             ignore_eos=True)
    params = body.sampling_params(max_tokens=9)
    assert (params.temperature, params.top_k, params.seed, params.max_tokens) == (0.0, 5, 7, 9)
    assert params.stop == ["END"] and params.ignore_eos and params.top_p == 1.0
    with pytest.raises(SamplingParamsError) as err:
        CompletionRequest(prompt="x", top_p=0).sampling_params(max_tokens=1)
    assert err.value.param == "top_p"


def test_unsupported_parameters_accept_only_their_neutral_value() -> None:
    CompletionRequest(prompt="x", echo=False, best_of=1, presence_penalty=0).check_supported()
    with pytest.raises(ApiError) as err:
        CompletionRequest(prompt="x", presence_penalty=0.5).check_supported()
    assert err.value.param == "presence_penalty" and err.value.status == 400


def test_chat_messages_for_the_template() -> None:
    body = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ], max_tokens=3, max_completion_tokens=5)
    assert [m.as_template_input() for m in body.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert body.max_tokens_param == ("max_completion_tokens", 5)


def test_response_shapes() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2)
    final = ChatShape("abc", "m").final("hi", "stop", usage)
    assert final["id"] == "chatcmpl-abc" and final["object"] == "chat.completion"
    assert final["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert final["usage"]["total_tokens"] == 7
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    shape = CompletionShape("abc", "m", include_usage=True)
    chunk = shape.text_chunk("x", None)
    assert chunk["usage"] is None and chunk["choices"][0]["text"] == "x"
    assert shape.usage_chunk(usage)["choices"] == []
    assert ChatShape("abc", "m").start_chunks()[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ChatShape("abc", "m").text_chunk("", "length")["choices"][0]["delta"] == {}
    encoded = sse({"a": "é"})
    assert encoded.startswith(b"data: ") and encoded.endswith(b"\n\n")
    assert json.loads(encoded[6:]) == {"a": "é"} and SSE_DONE == b"data: [DONE]\n\n"
