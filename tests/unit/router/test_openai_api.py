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
from cluster.router.responses import (
    SSE_DONE,
    ChatShape,
    ChoiceResult,
    CompletionShape,
    Usage,
    sse,
)
from engine.sampling_params import SamplingParamsError

USER = [{"role": "user", "content": "hi"}]


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
    body = CompletionRequest(
        prompt="x", temperature=0, top_k=5, seed=7, stop="END", ignore_eos=True
    )
    params = body.sampling_params(max_tokens=9)
    assert (params.temperature, params.top_k, params.seed, params.max_tokens) == (0.0, 5, 7, 9)
    assert params.stop == ["END"] and params.ignore_eos and params.top_p == 1.0
    with pytest.raises(SamplingParamsError) as err:
        CompletionRequest(prompt="x", top_p=0).sampling_params(max_tokens=1)
    assert err.value.param == "top_p"


def test_unsupported_parameters_accept_only_their_neutral_value() -> None:
    CompletionRequest(prompt="x", echo=False, best_of=1, logit_bias={}).check_supported()
    with pytest.raises(ApiError) as err:
        CompletionRequest(prompt="x", best_of=2).check_supported()
    assert err.value.param == "best_of" and err.value.status == 400


def test_penalties_and_logprobs_reach_the_sampling_params() -> None:
    body = CompletionRequest(prompt="x", presence_penalty=0.5, frequency_penalty=-1, logprobs=3)
    params = body.sampling_params(max_tokens=4)
    assert (params.presence_penalty, params.frequency_penalty, params.logprobs) == (0.5, -1, 3)
    assert CompletionRequest(prompt="x").sampling_params(max_tokens=1).logprobs is None
    chat = ChatCompletionRequest(messages=USER, logprobs=True, top_logprobs=4)
    assert chat.sampling_params(max_tokens=1).logprobs == 4
    chat = ChatCompletionRequest(messages=USER, logprobs=True)
    assert chat.sampling_params(max_tokens=1).logprobs == 0
    assert ChatCompletionRequest(messages=USER, logprobs=False).num_logprobs() is None
    with pytest.raises(ApiError) as err:
        ChatCompletionRequest(messages=USER, top_logprobs=2).check_supported()
    assert err.value.param == "top_logprobs"
    with pytest.raises(SamplingParamsError) as perr:
        CompletionRequest(prompt="x", frequency_penalty=2.5).sampling_params(max_tokens=1)
    assert perr.value.param == "frequency_penalty"


def test_chat_messages_for_the_template() -> None:
    body = ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_tokens=5,
        max_completion_tokens=5,
    )
    assert [m.as_template_input() for m in body.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert body.max_tokens_param == ("max_completion_tokens", 5)
    assert ChatCompletionRequest(messages=USER, max_tokens=3).max_tokens_param == ("max_tokens", 3)
    with pytest.raises(ApiError) as err:
        _ = ChatCompletionRequest(
            messages=USER, max_tokens=3, max_completion_tokens=5
        ).max_tokens_param
    assert err.value.param == "max_completion_tokens"


def test_response_shapes() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2)
    choices = [ChoiceResult(0, "hi", "stop"), ChoiceResult(1, "yo", "length", {"content": []})]
    final = ChatShape("abc", "m").final(choices, usage)
    assert final["id"] == "chatcmpl-abc" and final["object"] == "chat.completion"
    assert final["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert final["choices"][1]["index"] == 1 and final["choices"][1]["logprobs"] == {"content": []}
    assert final["usage"]["total_tokens"] == 7
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    shape = CompletionShape("abc", "m", include_usage=True)
    chunk = shape.text_chunk(2, "x", None)
    assert chunk["usage"] is None and chunk["choices"][0]["text"] == "x"
    assert chunk["choices"][0]["index"] == 2
    assert shape.usage_chunk(usage)["choices"] == []
    starts = ChatShape("abc", "m").start_chunks(2)
    assert [c["choices"][0]["index"] for c in starts] == [0, 1]
    assert starts[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ChatShape("abc", "m").text_chunk(0, "", "length")["choices"][0]["delta"] == {}
    encoded = sse({"a": "é"})
    assert encoded.startswith(b"data: ") and encoded.endswith(b"\n\n")
    assert json.loads(encoded[6:]) == {"a": "é"} and SSE_DONE == b"data: [DONE]\n\n"
