"""Completions and chat through the official openai client, against a real uvicorn."""

from __future__ import annotations

import asyncio

import httpx

from cluster.config import RouterConfig
from cluster.router.app import create_app
from cluster.router.dispatcher import Dispatcher
from engine.config import Role
from tests.unit.router.fakes import SCRIPT, FakeInstance, expected_text


def test_completion_non_streaming(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    result = router.openai().completions.create(model="tiny", prompt="Hello", max_tokens=12)
    assert result.choices[0].text == expected_text(12)
    assert result.choices[0].finish_reason == "length"
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert result.model == "tiny" and result.created > 0
    # <s> + 5 bytes; every generated token is counted once, whichever instance sent it.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (6, 12)
    assert result.usage.total_tokens == 18
    prefill = router.fakes[0]
    assert prefill.received[0].prompt_token_ids[0] == 0  # BOS added for plain prompts
    assert prefill.received[0].reply_to == router.dispatcher.inbox_address
    router.assert_no_leaks()


def test_completion_streaming_with_usage(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"tokens_per_step": 3}))
    chunks = list(
        router.openai().completions.create(
            model="tiny",
            prompt=[5, 6, 7],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected_text(20)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    usage = chunks[-1].usage
    assert not chunks[-1].choices and (usage.prompt_tokens, usage.completion_tokens) == (3, 20)
    router.assert_no_leaks()


def test_chat_non_streaming_uses_template(start_router, pd_pair, byte_tokenizer) -> None:
    router = start_router(pd_pair())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    result = router.openai().chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=9, temperature=0
    )
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected_text(9)
    prompt = "<s><|system|>Be brief.\n<|user|>Hi\n<|assistant|>"  # fakes.CHAT_TEMPLATE
    sent = router.fakes[0].received[0]
    assert byte_tokenizer.decode(sent.prompt_token_ids, skip_special_tokens=False) == prompt
    assert sent.sampling.temperature == 0.0 and sent.sampling.max_tokens == 9
    assert result.usage.prompt_tokens == len(sent.prompt_token_ids)
    router.assert_no_leaks()


def test_chat_streaming(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    chunks = list(
        router.openai().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=7, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected_text(7)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None
    router.assert_no_leaks()


def test_stop_string_ends_request_and_aborts_everywhere(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.01}))
    result = router.openai().completions.create(
        model="tiny", prompt="x", max_tokens=200, stop=["fox", "never"]
    )
    assert result.choices[0].text == SCRIPT[: SCRIPT.index("fox")]
    assert result.choices[0].finish_reason == "stop"
    request_id = result.id.removeprefix("cmpl-")
    for fake in router.fakes:  # prefill and decode instance alike
        assert fake.wait_abort(request_id).request_id == request_id
    # Tokens up to the one that completed the match were generated and are billed.
    assert result.usage.completion_tokens >= SCRIPT.index("fox") + 3
    router.assert_no_leaks()
    assert not router.fakes[1].active_ids
    # /metrics counts it as the client saw it end: finish_reason stop, not an abort.
    metrics = router.http().get("/metrics").text
    assert 'pdserve_requests_total{outcome="stop"} 1.0' in metrics, metrics
    assert 'outcome="abort"' not in metrics


def test_streaming_stop_string_spanning_tokens(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    chunks = list(
        router.openai().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=100,
            stop="lazy",
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == SCRIPT[: SCRIPT.index("lazy")]
    assert chunks[-1].choices[0].finish_reason == "stop"
    router.assert_no_leaks()


def test_tokens_out_of_order_and_duplicated(start_router, pd_pair) -> None:
    # D's tokens overtake P's first token; D swaps and repeats batches.
    fakes = pd_pair(prefill={"first_token_delay_s": 0.05}, decode={"shuffle": True})
    router = start_router(fakes)
    client = router.openai()
    for _ in range(3):
        result = client.completions.create(model="tiny", prompt="abc", max_tokens=40)
        assert result.choices[0].text == expected_text(40)
        assert result.usage.completion_tokens == 40
    stats = router.wait_idle()
    assert stats["duplicate_tokens"] > 0
    router.assert_no_leaks()


def test_mixed_instance_serves_alone(start_router, script) -> None:
    router = start_router([FakeInstance("mixed", Role.MIXED, script, tokens_per_step=4)])
    result = router.openai().completions.create(model="tiny", prompt="abc", max_tokens=1)
    assert result.choices[0].text == expected_text(1)
    streamed = router.openai().completions.create(
        model="tiny", prompt="a", max_tokens=30, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected_text(30)
    router.assert_no_leaks()


def test_models_and_health(start_router, pd_pair) -> None:
    ready = {"value": False}

    async def health() -> bool:
        return ready["value"]

    router = start_router(pd_pair(), health=health)
    models = router.openai().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with router.http() as http:
        assert http.get("/health").status_code == 503
        ready["value"] = True
        assert http.get("/health").status_code == 200


def test_app_runs_in_process_without_uvicorn(byte_tokenizer, script) -> None:
    """The app factory needs no Ray and no server: httpx drives it through ASGI."""
    mixed = FakeInstance("mixed", Role.MIXED, script).start()

    async def scenario() -> tuple[int, dict]:
        config = RouterConfig(model_name=None)
        dispatcher = Dispatcher([mixed.as_endpoint()], "127.0.0.1", config)
        await dispatcher.start()
        app = create_app(dispatcher, byte_tokenizer, max_model_len=64, model_name="folder")
        try:
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
                response = await http.post(
                    "/v1/completions", json={"prompt": "hi", "max_tokens": 5}
                )
                models = (await http.get("/v1/models")).json()
            assert models["data"][0]["id"] == "folder"  # the folder name without model_name
            return response.status_code, response.json()
        finally:
            await dispatcher.close()

    try:
        status, body = asyncio.run(scenario())
    finally:
        mixed.stop()
    assert status == 200, body
    assert body["choices"][0]["text"] == expected_text(5)


def test_long_prompt_is_tokenized_off_the_event_loop(start_router, pd_pair) -> None:
    router = start_router(pd_pair(), max_model_len=20_000)
    result = router.openai().completions.create(model="tiny", prompt="a" * 9000, max_tokens=2)
    assert result.usage.prompt_tokens == 9001
    assert result.choices[0].text == expected_text(2)
