"""Mixed (colocated) instances under the overlap schedule, through the real EngineCore on CPU.

A mixed step holds prefill chunks and decode rows together: a prompt's last chunk samples the
first token and the next step's decode row takes it from the device; chunked prefills are in
flight while other requests decode; requests arrive while steps are in flight; preemption and
prefix hits move blocks under the step in flight. Each scenario runs sequential and overlapped
on the same checkpoint and the tokens (and logprobs) must be identical.
"""

from __future__ import annotations

import random

from engine.config import EngineConfig, ModelConfig, Role
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.engine.helpers import assert_nothing_leaked
from tests.unit.worker.conftest import make_prompts
from worker.engine_core import EngineCore


def make_core(path, overlap: bool, num_blocks: int = 96, **scheduler) -> EngineCore:
    engine = EngineConfig.model_validate(
        {
            "scheduler": {"max_num_batched_tokens": 24, "block_size": 4, **scheduler},
            "cache": {"num_blocks": num_blocks},
        }
    )
    model = ModelConfig(path=str(path), device="cpu", dtype="float32")
    return EngineCore(model, engine, Role.MIXED, overlap=overlap)


def params_for(i: int, max_tokens: int) -> SamplingParams:
    """A mix: greedy, seeded temperature/top-k/top-p, penalties, logprobs."""
    kind = i % 4
    if kind == 0:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if kind == 1:
        return SamplingParams(
            temperature=0.9, top_k=40, top_p=0.9, seed=50 + i, max_tokens=max_tokens,
            ignore_eos=True,
        )  # fmt: skip
    if kind == 2:
        return SamplingParams(
            temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4, max_tokens=max_tokens,
            ignore_eos=True,
        )  # fmt: skip
    return SamplingParams(temperature=0.0, logprobs=3, max_tokens=max_tokens, ignore_eos=True)


def run(
    core: EngineCore,
    arrivals: list[tuple[int, Request]],
) -> tuple[dict[str, list[int]], dict[str, list]]:
    """Add each request at its step, step to completion; tokens and logprobs per request."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    tokens: dict[str, list[int]] = {r.request_id: [] for _, r in arrivals}
    logprobs: dict[str, list] = {r.request_id: [] for _, r in arrivals}
    step = 0
    while arrivals or core.has_work():
        while arrivals and arrivals[0][0] <= step:
            core.add_request(arrivals.pop(0)[1])
        for delta in core.step():
            tokens[delta.request_id].extend(delta.new_token_ids)
            if delta.logprobs is not None:
                logprobs[delta.request_id].extend(delta.logprobs)
        core.scheduler.check_invariants()
        step += 1
        assert step < 20_000
    assert_nothing_leaked(core.scheduler)
    return tokens, logprobs


def both(path, make_arrivals, **core_kwargs):
    """Sequential and overlapped results, and the overlapped core."""
    results, cores = [], []
    for overlap in (False, True):
        core = make_core(path, overlap, **core_kwargs)
        results.append(run(core, make_arrivals()))
        cores.append(core)
    return results[0], results[1], cores


def assert_same(sequential, overlapped) -> None:
    """Identical tokens and logprob alternatives; logprob values equal up to float rounding
    (preemption can fall in other steps, so a recomputed prefix may be chunked differently)."""
    assert overlapped[0] == sequential[0]
    for request_id, expected in sequential[1].items():
        got = overlapped[1][request_id]
        assert len(got) == len(expected)
        for (lp, top), (lp_o, top_o) in zip(expected, got, strict=True):
            assert [t for t, _ in top] == [t for t, _ in top_o]
            assert abs(lp - lp_o) < 1e-4
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(top, top_o, strict=True))


def requests(prompts, max_tokens, eos=None) -> list[Request]:
    eos = eos or {}
    out = []
    for i, prompt in enumerate(prompts):
        params = params_for(i, max_tokens)
        if i in eos:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        out.append(Request(f"r{i}", list(prompt), params, eos_token_ids=eos.get(i, ())))
    return out


def test_chunked_prefill_beside_decodes(checkpoints) -> None:
    """Long prompts are cut into chunks while short ones decode in the same steps."""
    prompts = make_prompts(8, seed=31, min_len=3, max_len=60)

    def arrivals():
        return [(0, r) for r in requests(prompts, 14)]

    sequential, overlapped, _ = both(checkpoints["llama"].path, arrivals)
    assert_same(sequential, overlapped)
    assert max(len(p) for p in prompts) > 24  # some prompt really took several chunks


def test_requests_arriving_mid_run(checkpoints) -> None:
    """Requests join while steps are in flight: their prefill chunks share steps with the
    decode rows of the others, and their first token feeds a decode row from the device."""
    prompts = make_prompts(14, seed=32, min_len=2, max_len=40)
    rng = random.Random(5)
    steps = sorted(rng.randrange(0, 40) for _ in prompts)

    def arrivals():
        return list(zip(steps, requests(prompts, 10), strict=True))

    sequential, overlapped, _ = both(checkpoints["qwen3"].path, arrivals)
    assert_same(sequential, overlapped)


def test_prefix_hits_while_in_flight(checkpoints) -> None:
    """Later requests share a long prefix with earlier ones and hit their cached blocks,
    committed by steps whose tokens were read back late."""
    shared = make_prompts(1, seed=33, min_len=20, max_len=20)[0]
    tails = make_prompts(8, seed=34, min_len=1, max_len=9)
    prompts = [shared + t for t in tails]

    def arrivals():
        return [(3 * i, r) for i, r in enumerate(requests(prompts, 9))]

    sequential, overlapped, cores = both(
        checkpoints["llama"].path, arrivals, enable_prefix_caching=True
    )
    assert_same(sequential, overlapped)
    hits = [c.block_manager.prefix_hits for c in cores]
    assert hits[1] > 0
    assert hits[0] == hits[1]  # overlap caches exactly what sequential does


def test_preemption_with_arrivals(checkpoints) -> None:
    """Too few blocks: running requests are preempted and recomputed while steps are in
    flight and new requests keep arriving."""
    prompts = make_prompts(9, seed=35, min_len=8, max_len=26)

    def arrivals():
        return [(2 * i, r) for i, r in enumerate(requests(prompts, 16))]

    sequential, overlapped, cores = both(
        checkpoints["qwen2"].path, arrivals, num_blocks=26, enable_prefix_caching=True
    )
    assert cores[1].scheduler.num_preemptions > 0
    assert_same(sequential, overlapped)


def test_stops_at_eos_and_max_tokens(checkpoints) -> None:
    """Requests end on EOS while their next step is in flight (its token is dropped) and at
    max_tokens (no step is scheduled past it)."""
    path = checkpoints["mistral"].path
    prompts = make_prompts(6, seed=36, min_len=3, max_len=30)
    greedy, _, _ = both(path, lambda: [(0, r) for r in requests(prompts, 12, eos={0: ()})])
    eos = {0: (greedy[0]["r0"][1],), 3: (greedy[0]["r3"][4],)}

    def arrivals():
        return [(i, r) for i, r in enumerate(requests(prompts, 12, eos=eos))]

    sequential, overlapped, _ = both(path, arrivals)
    assert_same(sequential, overlapped)
    tokens = overlapped[0]
    assert tokens["r0"] == greedy[0]["r0"][: greedy[0]["r0"].index(eos[0][0]) + 1]
    assert len(tokens["r3"]) == greedy[0]["r3"].index(eos[3][0]) + 1
    assert all(len(tokens[f"r{i}"]) == 12 for i in (1, 2, 4, 5))


def test_seeded_sampling_reproducible_in_any_batch(checkpoints) -> None:
    """A seeded request draws the same tokens alone, sequential, or overlapped in a busy batch."""
    path = checkpoints["llama"].path
    prompts = make_prompts(7, seed=37, min_len=3, max_len=30)
    seeded = Request(
        "seeded",
        prompts[0],
        SamplingParams(temperature=1.0, top_p=0.95, seed=777, max_tokens=15, ignore_eos=True),
    )
    alone, _ = run(make_core(path, False), [(0, seeded)])
    for overlap in (False, True):
        seeded = Request("seeded", prompts[0], seeded.sampling_params)
        busy = [(i, r) for i, r in enumerate(requests(prompts[1:], 15))] + [(4, seeded)]
        tokens, _ = run(make_core(path, overlap), busy)
        assert tokens["seeded"] == alone["seeded"]


def test_runner_state_is_dropped_when_requests_end(checkpoints) -> None:
    """Block-table rows and penalty counts of finished requests are released, also when the
    step that reports them has nothing to run (the engine went idle)."""
    path = checkpoints["llama"].path
    for overlap in (False, True):
        core = make_core(path, overlap)
        prompts = make_prompts(6, seed=38, min_len=3, max_len=20)
        run(core, [(0, r) for r in requests(prompts, 6)])
        core.step()  # idle: the scheduler hands over the last releases
        assert core.runner.block_tables.num_rows_used == 0
        assert core.runner.sampler.penalty_counts.num_requests == 0
