"""Cache-aware routing on 2P2D: a conversation's later turns go where its prefix is, move only the
KV the decode instance lacks, and stay token-identical to the offline engine; one hot prefix
does not pin every request on one instance."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams
from tests.integration.harness import (
    assert_all_free,
    failures_in,
    model_id,
    small_config,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)
BLOCK = 16
ANSWER_TOKENS = 20
SYSTEM = "You are a helpful assistant who answers in one short sentence. " * 4
TURNS = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]


@pytest.fixture(scope="module")
def dep():
    config = small_config(
        # A tight balance guard: a cache hit may not pick an instance busier than the idlest.
        router={
            "routing": "cache_aware",
            "cache_routing": {"max_load_ratio": 1.0, "prefill_slack_tokens": 0},
        },
        prefill={"instances": 2, "placement": {"num_cpus": 0.25}},
        decode={"instances": 2, "placement": {"num_cpus": 0.25}},
    )
    deployment = start(config)
    yield deployment
    deployment.stop()


@pytest.fixture(scope="module")
def conversation(default_model_path) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, answer ids, answer text) per turn from the offline engine, each prompt being
    the previous prompt and answer plus the next user message, as a chat client sends it."""
    from worker.llm import LLM

    llm = LLM(
        ModelConfig(path=str(default_model_path), device="cpu", dtype="float32"), EngineConfig()
    )
    params = SamplingParams(temperature=0, max_tokens=ANSWER_TOKENS, ignore_eos=True)
    turns, history = [], llm.tokenizer.encode(SYSTEM)
    for message in TURNS:
        user = llm.tokenizer.encode(f"\nUser: {message}\nAssistant:", add_special_tokens=False)
        prompt = history + user
        (done,) = llm.generate([prompt], params)
        turns.append((prompt, done.token_ids, done.text))
        history = prompt + done.token_ids
    del llm
    return turns


def _complete(url: str, prompt: list[int]) -> str:
    async def main() -> str:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            body = {
                "model": await model_id(client),
                "prompt": prompt,
                "max_tokens": ANSWER_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
            }
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

    return asyncio.run(main())


def _kv_bytes(dep) -> tuple[int, int]:
    stats = dep.stats()
    moved = sum(stats[f"prefill-{i}"]["counters"].get("transfer_bytes", 0) for i in range(2))
    skipped = sum(
        stats[f"prefill-{i}"]["counters"].get("transfer_bytes_skipped", 0) for i in range(2)
    )
    return moved, skipped


def _indexed(dep, instance: str) -> int:
    blocks = dep.stats()["router"]["routing"]["index"]["blocks"]
    return blocks.get(instance, 0)


def test_third_turn_moves_only_its_new_tokens(dep, conversation) -> None:
    block_bytes = None
    for turn, (prompt, _, text) in enumerate(conversation, start=1):
        before = _kv_bytes(dep)
        assert _complete(dep.url, prompt) == text, f"turn {turn}"
        moved, skipped = (after - b for after, b in zip(_kv_bytes(dep), before, strict=True))
        if turn == 1:
            assert skipped == 0
            block_bytes = moved // -(-len(prompt) // BLOCK)
            # Each decode instance publishes what it caches; wait until the router knows.
            wait_until(lambda: _indexed(dep, "decode-0") + _indexed(dep, "decode-1") > 0)
        if turn == 3:
            previous_prompt, previous_answer, _ = conversation[1]
            held = len(previous_prompt) + len(previous_answer)
            new_blocks = -(-len(prompt) // BLOCK) - held // BLOCK
            assert moved <= new_blocks * block_bytes, (moved, new_blocks, block_bytes)
            assert skipped >= len(previous_prompt) // BLOCK * block_bytes
    stats = assert_all_free(dep)
    assert not failures_in(stats)
    routing = stats["router"]["routing"]
    assert routing["decisions"].get("decode/cache_hit", 0) >= 2
    assert routing["prefix_hit_tokens"].get("decode", 0) > 0
    metrics = httpx.get(f"{dep.url}/metrics", timeout=30).text
    assert 'pdserve_kv_transfer_bytes_total{instance="prefill-' in metrics
    assert 'kind="skipped"' in metrics


def test_one_hot_prefix_is_spread_within_the_guard(dep) -> None:
    hot = SYSTEM * 3  # about 150 tokens every request shares

    async def main() -> None:
        async with httpx.AsyncClient(base_url=dep.url, timeout=300) as client:
            model = await model_id(client)

            async def ask(i: int) -> None:
                body = {"model": model, "prompt": f"{hot} Question {i}?", "max_tokens": 2}
                response = await client.post("/v1/completions", json=body)
                assert response.status_code == 200, (response.status_code, response.text[:300])

            await ask(0)  # one prefill instance now holds the hot prefix
            wait_until(lambda: max(_indexed(dep, f"prefill-{i}") for i in (0, 1)) >= 9)
            await asyncio.gather(*(ask(i) for i in range(1, 9)))

    before = _served(dep)
    asyncio.run(main())
    stats = assert_all_free(dep)
    counts = {name: n - before[name] for name, n in _served(dep).items()}
    assert sum(counts.values()) == 9
    # The holder computes only each request's few new tokens, so it may take most of them; but
    # whenever its queue was deeper than the idlest instance's, the guard sent the request on.
    assert min(counts.values()) >= 1, counts
    decisions = stats["router"]["routing"]["decisions"]
    assert decisions.get("prefill/balance_guard", 0) >= 1, decisions
    assert not failures_in(stats)


def _served(dep) -> dict[str, int]:
    stats = dep.stats()
    return {f"prefill-{i}": stats[f"prefill-{i}"]["counters"].get("requests", 0) for i in (0, 1)}
