"""n choices, seeds, penalties and logprobs through the official openai client."""

from __future__ import annotations

import openai
import pytest

from engine.config import Role
from tests.unit.router.fakes import SCRIPT, FakeInstance, expected_text, fake_logprobs

USER = [{"role": "user", "content": "Hi"}]


def test_n_choices_with_seeds(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    client = router.openai()
    result = client.completions.create(
        model="tiny", prompt="abc", max_tokens=10, n=3, seed=5, temperature=1.0
    )
    assert [c.index for c in result.choices] == [0, 1, 2]
    # The fakes shift their script by the seed: choice i ran with seed 5 + i.
    assert [c.text for c in result.choices] == [expected_text(10, 5 + i) for i in range(3)]
    assert all(c.finish_reason == "length" for c in result.choices)
    # The prompt counts once; the completions add up.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 30)
    received = router.fakes[0].wait_received(3)
    request_id = result.id.removeprefix("cmpl-")
    assert sorted(r.request_id for r in received) == [f"{request_id}-{i}" for i in range(3)]
    assert sorted(r.sampling.seed for r in received) == [5, 6, 7]
    again = client.completions.create(
        model="tiny", prompt="abc", max_tokens=10, n=3, seed=5, temperature=1.0
    )
    assert [c.text for c in again.choices] == [c.text for c in result.choices]
    router.assert_no_leaks()


def test_n_greedy_choices_are_identical(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    result = router.openai().chat.completions.create(
        model="tiny", messages=USER, max_tokens=6, n=2, temperature=0
    )
    assert [c.message.content for c in result.choices] == [expected_text(6)] * 2
    assert all(r.sampling.seed is None for r in router.fakes[0].wait_received(2))
    router.assert_no_leaks()


def test_n_choices_streaming_chat_with_usage(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"tokens_per_step": 2}))
    chunks = list(
        router.openai().chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=15,
            n=3,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = {0: "", 1: "", 2: ""}
    finishes: dict[int, list] = {0: [], 1: [], 2: []}
    roles = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index].append(choice.finish_reason)
        if choice.delta.role:
            roles.add(choice.index)
        assert chunk.usage is None
    assert texts == {i: expected_text(15, 1 + i) for i in range(3)}
    assert all(f[-1] == "length" and not any(f[:-1]) for f in finishes.values())
    assert roles == {0, 1, 2}
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 45
    assert usage.total_tokens == usage.prompt_tokens + 45
    router.assert_no_leaks()


def test_n_choices_with_a_stop_string(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.01}))
    result = router.openai().completions.create(
        model="tiny", prompt="x", max_tokens=200, n=2, stop=["fox"]
    )
    assert [c.text for c in result.choices] == [SCRIPT[: SCRIPT.index("fox")]] * 2
    assert [c.finish_reason for c in result.choices] == ["stop", "stop"]
    request_id = result.id.removeprefix("cmpl-")
    for fake in router.fakes:
        for index in range(2):
            fake.wait_abort(f"{request_id}-{index}")
    router.assert_no_leaks()


def test_streamed_n_choices_with_stop_strings(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    stream = router.openai().completions.create(
        model="tiny", prompt="x", max_tokens=100, n=2, stop="lazy", stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [SCRIPT[: SCRIPT.index("lazy")]] * 2
    router.assert_no_leaks()


def test_one_failing_choice_fails_the_response_and_aborts_the_others(start_router, script) -> None:
    fake = FakeInstance("m", Role.MIXED, script, step_s=0.05, error="KV lost", fail_suffix="-1")
    router = start_router([fake], migrate_on_failure=False)  # the failure must reach the client
    with pytest.raises(openai.InternalServerError) as err:
        router.openai().completions.create(model="tiny", prompt="x", max_tokens=50, n=3)
    assert "KV lost" in str(err.value)
    received = fake.wait_received(3)
    for request in received:
        if not request.request_id.endswith("-1"):
            assert fake.wait_abort(request.request_id).reason == "request failed"
    router.assert_no_leaks()


def test_penalties_are_sent_to_the_instances(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    router.openai().chat.completions.create(
        model="tiny", messages=USER, max_tokens=2, presence_penalty=0.5, frequency_penalty=-1.25
    )
    sampling = router.fakes[0].wait_received(1)[0].sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.25)
    assert sampling.logprobs is None
    router.assert_no_leaks()


def _expected_completion_logprobs(script: list[int], num_tokens: int, top: int) -> dict:
    text = expected_text(num_tokens)
    tokens, token_logprobs, tops = [], [], []
    for index in range(num_tokens):
        logprob, alternatives = fake_logprobs(script, script[index % len(script)], index, top)
        tokens.append(text[index])
        token_logprobs.append(logprob)
        tops.append({_char(script, t): lp for t, lp in alternatives})
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": list(range(num_tokens)),
    }


def _char(script: list[int], token_id: int) -> str:
    return SCRIPT[script.index(token_id)]


def test_completion_logprobs(start_router, pd_pair, script) -> None:
    router = start_router(pd_pair(decode={"tokens_per_step": 3}))
    client = router.openai()
    result = client.completions.create(model="tiny", prompt="x", max_tokens=12, logprobs=2)
    expected = _expected_completion_logprobs(script, 12, 2)
    assert result.choices[0].logprobs.model_dump() == expected
    assert router.fakes[0].wait_received(1)[0].sampling.logprobs == 2
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(
        model="tiny", prompt="x", max_tokens=12, logprobs=2, stream=True
    ):
        if chunk.choices[0].logprobs is not None:
            for key, values in chunk.choices[0].logprobs.model_dump().items():
                streamed[key] += values
    assert streamed == expected  # text offsets count on across chunks
    zero = client.completions.create(model="tiny", prompt="x", max_tokens=3, logprobs=0)
    assert zero.choices[0].logprobs.top_logprobs == [{}, {}, {}]
    assert (
        client.completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].logprobs
        is None
    )
    router.assert_no_leaks()


def _check_chat_content(
    content, script: list[int], num_tokens: int, top: int, seed: int = 0
) -> None:
    text = expected_text(num_tokens, seed)
    assert "".join(entry.token for entry in content) == text
    for index, entry in enumerate(content):
        token_id = script[(index + seed) % len(script)]
        logprob, alternatives = fake_logprobs(script, token_id, index, top)
        assert entry.logprob == logprob and entry.bytes == list(text[index].encode())
        assert [(a.token, a.logprob) for a in entry.top_logprobs] == [
            (_char(script, t), lp) for t, lp in alternatives
        ]
        assert all(a.bytes == list(a.token.encode()) for a in entry.top_logprobs)


def test_chat_logprobs(start_router, pd_pair, script) -> None:
    router = start_router(pd_pair())
    client = router.openai()
    result = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=8, logprobs=True, top_logprobs=3
    )
    _check_chat_content(result.choices[0].logprobs.content, script, 8, 3)
    bare = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, logprobs=True)
    assert [entry.top_logprobs for entry in bare.choices[0].logprobs.content] == [[], []]
    router.assert_no_leaks()


def test_streamed_chat_logprobs_with_n_choices(start_router, pd_pair, script) -> None:
    router = start_router(pd_pair(decode={"tokens_per_step": 2}))
    stream = router.openai().chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=9,
        n=2,
        seed=3,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    content: dict[int, list] = {0: [], 1: []}
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.logprobs is not None:
            content[choice.index] += choice.logprobs.content
    for index in range(2):
        _check_chat_content(content[index], script, 9, 2, seed=3 + index)
    router.assert_no_leaks()
