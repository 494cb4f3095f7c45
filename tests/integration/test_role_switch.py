"""Elastic 2P2D switching instance roles while serving (cluster/elastic/switching.py): under a
steady load and while requests are mid-prefill and mid-decode, no request fails, every output
is the offline engine's, and every KV block is free after. Then, on the same deployment, an
instance added while serving (cluster/elastic/scaling.py) takes requests and is removed again,
with the same guarantees."""

from __future__ import annotations

import asyncio
import itertools
import threading

import httpx
import pytest
import ray

from cluster.cli_status import collect, render
from tests.integration.conftest import MAX_TOKENS
from tests.integration.harness import (
    FAILURE_COUNTERS,
    assert_all_free,
    complete,
    model_id,
    prompts,
    run_load,
    small_config,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)
SWITCH_WAIT_S = 120.0
# A decode instance that is leaving refuses the allocations already on their way to it, and
# the prefill instance asks the other one: a refusal, not a failure.
EXPECTED = {"allocations_refused"}


@pytest.fixture(scope="module")
def dep():
    config = small_config(
        # A generous allocation deadline: while one decode instance drains, the other is the
        # only one, and on a loaded CI machine its answer may take seconds.
        prefill={"instances": 2, "placement": {"num_cpus": 0.25}, "allocation_timeout_s": 10.0},
        decode={"instances": 2, "placement": {"num_cpus": 0.25}},
        # Only forced switches: the policy's first look needs `hysteresis` looks to act.
        elastic={"enabled": True, "decision_interval_s": 3600, "drain_timeout_s": 2.0},
    )
    deployment = start(config)
    yield deployment
    deployment.stop()


class SteadyLoad:
    """`workers` clients, each sending the next test prompt as soon as its last one ended."""

    def __init__(self, url: str, workers: int = 3) -> None:
        self.url = url
        self.workers = workers
        self.results: list[tuple[str, str | BaseException]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(180)

    async def _main(self) -> None:
        prompt_cycle = itertools.cycle(prompts())
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            model = await model_id(client)

            async def worker(index: int) -> None:
                while not self._stop.is_set():
                    prompt = next(prompt_cycle)
                    try:
                        text = await complete(client, model, prompt, MAX_TOKENS, bool(index % 2))
                    except BaseException as exc:
                        self.results.append((prompt, exc))
                    else:
                        self.results.append((prompt, text))

            await asyncio.gather(*(worker(i) for i in range(self.workers)))

    def wait_for(self, count: int) -> None:
        wait_until(lambda: len(self.results) >= count, timeout_s=120)


def salted(url: str, prompt_list: list[str], salt: str) -> list[str]:
    """Greedy completions under fresh cache salts: no instance holds their prefixes, so the
    router and the prefill instances choose by load."""

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            model = await model_id(client)

            async def one(index: int, prompt: str) -> str:
                body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS}
                body |= {"temperature": 0, "cache_salt": f"scale-{salt}-{index}"}
                response = await client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompt_list)))

    return asyncio.run(main())


def force(dep, name: str, role: str):
    return dep.controller.force_switch.remote(name, role, SWITCH_WAIT_S)


def served_as_prefill(dep) -> int:
    return dep.stats()["decode-1"]["counters"].get("requests", 0)


def roles(dep) -> dict[str, str]:
    return {n: s.get("role") for n, s in dep.stats().items() if n != "router"}


def check(dep, results, reference_outputs) -> dict:
    failed = [(prompt, text) for prompt, text in results if isinstance(text, BaseException)]
    if failed:
        counters = {n: s.get("counters") for n, s in dep.stats().items()}
        raise AssertionError(f"{len(failed)} of {len(results)} failed: {failed}; {counters}")
    for prompt, text in results:
        assert text == reference_outputs[prompt], prompt
    stats = assert_all_free(dep)
    unexpected = [
        f"{name}: {key}={value}"
        for name, s in stats.items()
        for key, value in s.get("counters", {}).items()
        if key in FAILURE_COUNTERS and key not in EXPECTED and value
    ]
    assert not unexpected, unexpected
    return stats


def test_switches_under_a_steady_load(dep, reference_outputs) -> None:
    with SteadyLoad(dep.url) as load:
        load.wait_for(2)
        record = ray.get(force(dep, "decode-1", "prefill"), timeout=SWITCH_WAIT_S + 30)
        assert record["outcome"] == "done", record
        served = len(load.results)
        load.wait_for(served + 4)
        # The new prefill instance takes its share (how soon depends on how the steady
        # clients' prompts overlap, so it is waited for rather than assumed after N results)
        wait_until(lambda: served_as_prefill(dep) > 0, timeout_s=90)
        record = ray.get(force(dep, "prefill-0", "decode"), timeout=SWITCH_WAIT_S + 30)
        assert record["outcome"] == "done", record
        load.wait_for(len(load.results) + 3)
    assert roles(dep) == {
        "prefill-0": "decode",
        "prefill-1": "prefill",
        "decode-0": "decode",
        "decode-1": "prefill",
        "messager-0": None,
        "messager-1": None,
    }
    stats = check(dep, load.results, reference_outputs)
    assert stats["decode-1"]["counters"].get("requests", 0) > 0  # served as prefill
    assert stats["decode-1"]["counters"]["switches_done"] == 1


def test_switch_forced_mid_prefill_and_mid_decode_completes_them(dep, reference_outputs):
    prompt_list = prompts(8)
    results: list[str] = []
    load = threading.Thread(
        target=lambda: results.extend(run_load(dep.url, prompt_list, MAX_TOKENS)), daemon=True
    )
    load.start()

    def both_busy() -> bool:
        stats = dep.stats()
        prefilling = stats["prefill-1"].get("backlog_tokens", 0) > 0
        return prefilling and stats["decode-0"].get("running", 0) > 0

    wait_until(both_busy, timeout_s=60)
    to_decode = force(dep, "prefill-1", "decode")  # mid-prefill
    to_prefill = force(dep, "decode-0", "prefill")  # mid-decode (run after the first)
    for ref in (to_decode, to_prefill):
        record = ray.get(ref, timeout=2 * SWITCH_WAIT_S)
        assert record["outcome"] == "done", record
    load.join(180)
    assert len(results) == len(prompt_list)
    check(dep, list(zip(prompt_list, results, strict=True)), reference_outputs)
    switched = roles(dep)
    assert (switched["prefill-1"], switched["decode-0"]) == ("decode", "prefill")


def test_an_added_instance_serves_and_is_removed_without_a_failed_request(dep, reference_outputs):
    controller = dep.controller
    with SteadyLoad(dep.url, workers=2) as load:
        load.wait_for(len(load.results) + 1)
        record = ray.get(controller.force_add.remote("decode", SWITCH_WAIT_S), timeout=180)
        assert record["outcome"] == "done", record
        name = record["instance"]  # indices go on from the config's: decode-2
        assert name == "decode-2"
        added = ray.get_actor(name)
        # It takes requests: salted ones, whose prefix no instance holds, go by load, and it
        # is the least loaded decode instance. The supervisor watches it like the others.
        taken = lambda: ray.get(added.stats.remote())["counters"].get("kv_complete", 0)  # noqa: E731
        for attempt in range(5):
            batch = prompts(3)
            for prompt, text in zip(batch, salted(dep.url, batch, f"{attempt}"), strict=True):
                assert text == reference_outputs[prompt], prompt
            if taken():
                break
        assert taken() > 0
        wait_until(lambda: name in dep.stats(), timeout_s=30)
        record = ray.get(controller.force_remove.remote(name, SWITCH_WAIT_S), timeout=180)
        assert record["outcome"] == "done", record
        load.wait_for(len(load.results) + 2)
    with pytest.raises(ValueError):
        ray.get_actor(name)  # its actor is gone
    wait_until(lambda: name not in dep.stats(), timeout_s=30)  # the supervisor let it go
    check(dep, load.results, reference_outputs)
    counters = ray.get(controller.stats.remote())["counters"]
    assert (counters["add_done"], counters["remove_done"]) == (1, 1)
    text = render(*collect(dep.config.cluster.namespace, 10.0))
    assert "instances added 1, removed 1" in text
    assert f"add {name} decode: done" in text and f"remove {name} decode: done" in text
    assert 'event="add_done"' in httpx.get(f"{dep.url}/metrics", timeout=30).text
