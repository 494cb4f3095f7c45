"""The overlap schedule through the real EngineCore on CPU: execute N, save N-1, postprocess N.

Every scenario runs twice on the same checkpoint, sequential and overlapped, and the tokens must
be identical: placeholders are filled from the previous step's sampled ids, a request that
finishes while a step is in flight drops its extra token, and preemption recomputes correctly.
"""

from __future__ import annotations

import pytest

from engine.batch import PLACEHOLDER_TOKEN
from engine.config import EngineConfig, ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.engine.helpers import assert_nothing_leaked
from tests.unit.worker.conftest import make_prompts
from worker.engine_core import EngineCore


def make_core(path, overlap: bool, num_blocks: int = 64, **scheduler) -> EngineCore:
    engine = EngineConfig.model_validate(
        {
            "scheduler": {"max_num_batched_tokens": 32, "block_size": 4, **scheduler},
            "cache": {"num_blocks": num_blocks},
        }
    )
    model = ModelConfig(path=str(path), device="cpu", dtype="float32")
    return EngineCore(model, engine, overlap=overlap)


def count_placeholders(core: EngineCore) -> list[int]:
    """Counts chunks that reach the runner with a placeholder token."""
    seen = [0]
    execute = core.runner.preprocess_and_execute

    def counting(sched):
        seen[0] += sum(PLACEHOLDER_TOKEN in c.token_ids for c in sched.chunks)
        return execute(sched)

    core.runner.preprocess_and_execute = counting
    return seen


def run(core: EngineCore, requests: list[Request]) -> dict[str, list[int]]:
    """Step to completion; tokens per request as the deltas delivered them."""
    for request in requests:
        core.add_request(request)
    streamed: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for _ in range(10_000):
        if not core.has_work():
            break
        for delta in core.step():
            streamed[delta.request_id].extend(delta.new_token_ids)
        core.scheduler.check_invariants()
    assert not core.has_work()
    for request in requests:
        assert streamed[request.request_id] == request.output_token_ids
    assert_nothing_leaked(core.scheduler)
    return streamed


def make_requests(prompts, max_tokens: int, eos: dict[int, int] | None = None) -> list[Request]:
    requests = []
    for i, prompt in enumerate(prompts):
        seeded = i % 3 == 2  # a few sampled rows: their seeds depend on num_generated only
        params = SamplingParams(
            temperature=0.8 if seeded else 0.0,
            seed=100 + i if seeded else None,
            max_tokens=max_tokens,
            ignore_eos=eos is None or i not in eos,
        )
        eos_ids = (eos[i],) if eos and i in eos else ()
        requests.append(Request(f"r{i}", list(prompt), params, eos_token_ids=eos_ids))
    return requests


def both_modes(path, prompts, max_tokens, eos=None, **core_kwargs):
    results, placeholders = [], None
    for overlap in (False, True):
        core = make_core(path, overlap, **core_kwargs)
        seen = count_placeholders(core)
        results.append(run(core, make_requests(prompts, max_tokens, eos)))
        placeholders = seen[0]
        preemptions = core.scheduler.num_preemptions
    return results[0], results[1], placeholders, preemptions


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "llama_tied"])
def test_overlap_matches_sequential(checkpoints, name) -> None:
    prompts = make_prompts(6, seed=11, max_len=30)
    sequential, overlapped, placeholders, _ = both_modes(checkpoints[name].path, prompts, 12)
    assert overlapped == sequential
    assert placeholders > 0  # decode steps really ran ahead of the read-back


def test_request_finishing_in_flight(checkpoints) -> None:
    """Requests stop on EOS mid-batch; the overlapped step computed one token too many."""
    path = checkpoints["llama"].path
    prompts = make_prompts(4, seed=5, max_len=20)
    greedy = both_modes(path, prompts, 10)[0]
    eos = {0: greedy["r0"][2], 1: greedy["r1"][5]}  # r0 ends at its 3rd token, r1 at its 6th
    sequential, overlapped, _, _ = both_modes(path, prompts, 10, eos=eos)
    assert overlapped == sequential
    assert len(overlapped["r0"]) == greedy["r0"].index(eos[0]) + 1
    assert len(overlapped["r1"]) == greedy["r1"].index(eos[1]) + 1


def test_preemption_matches_sequential(checkpoints) -> None:
    prompts = make_prompts(5, seed=9, min_len=10, max_len=24)
    sequential, overlapped, _, preemptions = both_modes(
        checkpoints["qwen2"].path, prompts, 16, num_blocks=22
    )
    assert preemptions > 0
    assert overlapped == sequential


def test_preemption_with_prefix_cache(checkpoints) -> None:
    """A preempted request can be re-admitted at once from its cached blocks, in the very step
    that preempted it, while its last token is still in flight."""
    shared = make_prompts(1, seed=3, min_len=16, max_len=16)[0]
    prompts = [shared + p for p in make_prompts(5, seed=4, min_len=2, max_len=6)]
    sequential, overlapped, _, preemptions = both_modes(
        checkpoints["llama"].path, prompts, 14, num_blocks=24, enable_prefix_caching=True
    )
    assert preemptions > 0
    assert overlapped == sequential


def test_instance_loop_drives_overlap(checkpoints) -> None:
    """The instance loop under overlap publishes every saved step's deltas, and the tokens
    equal sequential mode."""
    from cluster.config import PdserveConfig
    from cluster.instances.loop import InstanceLoop
    from cluster.instances.roles import MixedRole

    path = checkpoints["llama"].path
    prompts = make_prompts(4, seed=21, max_len=20)
    results = []
    for overlap in (False, True):
        core = make_core(path, overlap)
        requests = make_requests(prompts, 9)
        streamed: dict[str, list[int]] = {r.request_id: [] for r in requests}
        config = PdserveConfig.model_validate({"model": {"path": str(path), "device": "cpu"}})
        loop = InstanceLoop("m0", "127.0.0.1", core, MixedRole(config))
        publish = loop.publish

        def capture(deltas, streamed=streamed, publish=publish) -> None:
            for delta in deltas:
                streamed[delta.request_id].extend(delta.new_token_ids)
            publish(deltas)

        loop.publish = capture
        for request in requests:
            core.add_request(request)
        while core.has_work():
            loop.iterate()
        loop.close()
        assert loop.failed_steps == 0
        results.append(streamed)
    assert results[0] == results[1]
