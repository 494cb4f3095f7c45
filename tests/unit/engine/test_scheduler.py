from __future__ import annotations

import pytest

from engine.config import Role
from engine.request import RequestStatus
from tests.unit.engine.helpers import (
    assert_nothing_leaked,
    expected_tokens,
    fake_run,
    make_request,
    make_scheduler,
    run_to_completion,
)

PROMPTS = {f"r{i}": [i + 1] * (3 + 7 * i) for i in range(6)}


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("prefix", [True, False])
def test_continuous_batching_produces_each_requests_tokens(chunked: bool, prefix: bool) -> None:
    sched = make_scheduler(
        max_num_batched_tokens=16,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=prefix,
    )
    for rid, prompt in PROMPTS.items():
        sched.add_request(make_request(rid, prompt, max_tokens=5))
    outputs = run_to_completion(sched)
    for rid, prompt in PROMPTS.items():
        assert outputs[rid] == expected_tokens(prompt, 5)
    assert_nothing_leaked(sched)


def test_chunked_prefill_respects_budget_and_samples_once() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("long", list(range(1, 21)), max_tokens=2))
    starts = []
    while True:
        out = sched.schedule()
        assert out.num_tokens <= 8
        (chunk,) = out.chunks
        starts.append((chunk.start_pos, chunk.num_tokens, chunk.sample))
        sched.update_from_output(out, fake_run(sched, out))
        if chunk.sample:
            break
    assert starts == [(0, 8, False), (8, 8, False), (16, 4, True)]
    run_to_completion(sched)
    assert_nothing_leaked(sched)


def test_preemption_by_recompute_keeps_outputs_and_frees_everything() -> None:
    # 10 blocks of 4 tokens cannot hold three requests growing to 20 tokens each.
    sched = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=64)
    prompts = {"a": [5] * 9, "b": [6] * 9, "c": [7] * 9}
    for rid, prompt in prompts.items():
        sched.add_request(make_request(rid, prompt, max_tokens=11))
    outputs = run_to_completion(sched)
    assert sched.num_preemptions > 0
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected_tokens(prompt, 11)
    assert_nothing_leaked(sched)


def test_abort_in_every_state_frees_blocks() -> None:
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    sched.add_request(make_request("running", list(range(1, 12)), max_tokens=50))
    sched.add_request(make_request("waiting", list(range(1, 40)), max_tokens=50))
    out = sched.schedule()
    sched.update_from_output(out, fake_run(sched, out))
    assert sched.abort_request("running") and sched.abort_request("waiting")
    assert not sched.abort_request("unknown")
    assert_nothing_leaked(sched)


def test_eos_and_stop_token_ids_finish_early() -> None:
    sched = make_scheduler()
    prompt = [1, 2, 3]
    first = expected_tokens(prompt, 3)
    req = make_request("eos", prompt, max_tokens=10)
    req.eos_token_ids = (first[1],)
    sched.add_request(req)
    sched.add_request(make_request("stop", [4, 5], max_tokens=10, stop_token_ids=[7777]))
    ignore = make_request("ignore", prompt, max_tokens=3, ignore_eos=True)
    ignore.eos_token_ids = (first[0],)
    sched.add_request(ignore)
    outputs = run_to_completion(sched)
    assert outputs["eos"] == first[:2]
    assert outputs["ignore"] == first
    assert len(outputs["stop"]) == 10
    assert_nothing_leaked(sched)


def test_prefix_cache_hit_skips_shared_prompt() -> None:
    sched = make_scheduler(num_blocks=32, block_size=4)
    shared = list(range(1, 17))
    sched.add_request(make_request("first", [*shared, 40], max_tokens=2))
    run_to_completion(sched)
    sched.add_request(make_request("second", [*shared, 41, 42], max_tokens=2))
    out = sched.schedule()
    (chunk,) = out.chunks
    assert chunk.start_pos == 16 and chunk.token_ids == [41, 42]
    sched.update_from_output(out, fake_run(sched, out))
    run_to_completion(sched)
    assert_nothing_leaked(sched)


def test_prompt_over_context_is_refused() -> None:
    sched = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="context"):
        sched.add_request(make_request("x", list(range(8))))


def test_context_length_finishes_with_length() -> None:
    sched = make_scheduler(max_model_len=8)
    sched.add_request(make_request("x", list(range(1, 6)), max_tokens=100))
    outputs = run_to_completion(sched)
    assert len(outputs["x"]) == 3
    assert_nothing_leaked(sched)


def test_prefill_role_holds_blocks_until_sent() -> None:
    sched = make_scheduler(role=Role.PREFILL, max_num_batched_tokens=8)
    req = make_request("p", list(range(1, 20)), max_tokens=10)
    assert sched.reserve_prefill(req)
    assert req.status is RequestStatus.WAITING_FOR_ALLOCATION
    sched.check_invariants()
    sched.add_request(req)
    deltas = []
    while sched.has_work():
        out = sched.schedule()
        deltas += sched.update_from_output(out, fake_run(sched, out))
    (delta,) = deltas
    assert delta.status is RequestStatus.SENDING_KV
    assert delta.new_token_ids == expected_tokens(req.prompt_token_ids, 1)
    assert sched.block_manager.num_used_blocks == 5
    sched.check_invariants()
    sched.release_sent("p", RequestStatus.FINISHED_STOPPED)
    assert_nothing_leaked(sched)
    # The sent prompt stays in P's prefix cache.
    assert len(sched.block_manager.match_prefix(list(range(1, 20)))) == 4


def test_prefill_role_first_token_eos_frees_at_once() -> None:
    sched = make_scheduler(role=Role.PREFILL)
    req = make_request("p", [3, 4, 5], max_tokens=1)
    assert sched.reserve_prefill(req)
    sched.add_request(req)
    out = sched.schedule()
    (delta,) = sched.update_from_output(out, fake_run(sched, out))
    assert delta.status is RequestStatus.FINISHED_LENGTH
    assert_nothing_leaked(sched)


def test_decode_role_continues_from_remote_kv() -> None:
    sched = make_scheduler(role=Role.DECODE, num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    want = expected_tokens(prompt, 6)
    req = make_request("d", prompt, max_tokens=6)
    assert sched.reserve_remote(req)
    assert req.status is RequestStatus.WAITING_FOR_KV and len(req.block_ids) == 3
    assert sched.schedule().is_empty  # nothing runs before the KV is complete
    delta = sched.start_remote("d", want[0])
    assert delta is not None and delta.new_token_ids == [want[0]]
    outputs = run_to_completion(sched)
    assert [want[0], *outputs["d"]] == want
    assert_nothing_leaked(sched)


def test_decode_role_reuses_a_cached_prefix_of_remote_kv() -> None:
    sched = make_scheduler(role=Role.DECODE, num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    want = expected_tokens(prompt, 4)
    first = make_request("a", prompt, max_tokens=4)
    assert sched.reserve_remote(first, reuse_prefix=True) and first.num_cached_tokens == 0
    sched.start_remote("a", want[0])
    run_to_completion(sched)  # its prompt blocks (and full output blocks) stay cached
    longer = [*prompt, *want[:3], 50, 51]  # the next turn: prompt, answer, a new message
    again = make_request("b", longer, max_tokens=3)
    assert sched.reserve_remote(again, reuse_prefix=True)
    assert again.num_cached_tokens == 12  # three full blocks P need not send
    plain = make_request("c", longer, max_tokens=3)
    assert sched.reserve_remote(plain) and plain.num_cached_tokens == 0
    assert not set(plain.block_ids) & set(again.block_ids)
    for rid in ("b", "c"):
        sched.abort_request(rid)
    assert_nothing_leaked(sched)


def test_decode_role_refuses_when_full_and_frees_on_abort() -> None:
    sched = make_scheduler(role=Role.DECODE, num_blocks=4, block_size=4)
    assert sched.reserve_remote(make_request("a", list(range(1, 12))))
    assert not sched.reserve_remote(make_request("b", list(range(1, 12))))
    assert sched.abort_request("a", RequestStatus.FINISHED_ERROR)
    assert sched.start_remote("a", 5) is None  # a late KV-complete is ignored
    assert_nothing_leaked(sched)


def test_sampling_params_validation_names_the_field() -> None:
    from engine.sampling_params import SamplingParams, SamplingParamsError

    for kwargs, name in [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
    ]:
        with pytest.raises(SamplingParamsError) as info:
            SamplingParams(**kwargs)
        assert info.value.param == name


def test_prefill_role_abort_during_preparation_frees_reservation() -> None:
    sched = make_scheduler(role=Role.PREFILL, num_blocks=4, block_size=4)
    req = make_request("p", list(range(1, 14)))
    assert sched.reserve_prefill(req)
    assert not sched.reserve_prefill(make_request("q", list(range(1, 14))))  # P is full
    assert sched.abort_request("p")
    assert_nothing_leaked(sched)
