"""Penalties and logprobs on the engine side: validation, what the scheduler hands the runner,
and how the runner's logprobs reach the token deltas. No torch."""

from __future__ import annotations

import pytest

from engine.batch import PLACEHOLDER_TOKEN
from engine.config import Role
from engine.protocol import codec
from engine.request import Request, RequestStatus
from engine.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingParamsError
from tests.unit.engine.helpers import (
    assert_nothing_leaked,
    fake_run,
    make_request,
    make_scheduler,
)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"presence_penalty": "0.5"}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": 1.5}, "logprobs"),
        ({"seed": 2**63}, "seed"),
        ({"top_k": 2**31}, "top_k"),
    ],
)
def test_out_of_range_values_name_their_field(fields: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**fields)
    assert err.value.param == param and param in str(err.value)


def test_bounds_are_inclusive_and_round_trip() -> None:
    params = SamplingParams(
        presence_penalty=-2, frequency_penalty=2.0, logprobs=MAX_LOGPROBS, seed=-(2**63)
    )
    assert params.has_penalties
    assert codec.decode(codec.encode(params)) == params  # the extremes fit msgpack's ints
    assert not SamplingParams(logprobs=0).has_penalties
    assert SamplingParams(frequency_penalty=0.1).has_penalties
    assert codec.decode(codec.encode(SamplingParams())).logprobs is None


def _run_until_done(sched, on_chunks) -> None:
    while sched.has_work():
        out = sched.schedule()
        on_chunks(out.chunks)
        sched.update_from_output(out, fake_run(sched, out))
    assert_nothing_leaked(sched)


def test_output_tokens_only_for_sampling_chunks_of_penalized_requests() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)  # the long prompt is chunked
    penalized = make_request("pen", list(range(1, 20)), max_tokens=4, presence_penalty=0.5)
    plain = make_request("plain", [7, 8, 9], max_tokens=4)
    sched.add_request(penalized)
    sched.add_request(plain)
    seen: list[tuple[str, bool, list[int] | None]] = []

    def record(chunks) -> None:
        for chunk in chunks:
            request = sched.requests[chunk.request_id]
            seen.append((chunk.request_id, chunk.sample, chunk.output_token_ids))
            if chunk.output_token_ids is not None:
                # A copy of the output so far: the runner may keep it while the scheduler
                # appends the next token.
                assert chunk.output_token_ids == request.output_token_ids
                assert chunk.output_token_ids is not request.output_token_ids

    _run_until_done(sched, record)
    assert all(tokens is None for rid, _, tokens in seen if rid == "plain")
    pen = [(sample, tokens) for rid, sample, tokens in seen if rid == "pen"]
    assert all(tokens is None for sample, tokens in pen if not sample)  # prefill chunks
    # Only the first sampling chunk carries the output: the runner keeps the counts after it.
    assert [tokens for sample, tokens in pen if sample] == [[], None, None, None]
    assert penalized.num_output_tokens == 4


def test_output_tokens_are_sent_again_after_preemption() -> None:
    """The runner forgets a preempted request's counts: its first sampling chunk after being
    readmitted carries the whole output again (nothing is in flight then)."""
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add_request(make_request("b", [4, 5, 6, 7, 8], max_tokens=8))
    sent: list[list[int] | None] = []
    for step in range(200):
        if not sched.has_work():
            break
        if step == 1:  # "a" runs behind "b", so it is the one preempted when "b" grows
            sched.add_request(make_request("a", [1, 2, 3], max_tokens=8, frequency_penalty=1.0))
        out = sched.schedule()
        sent += [c.output_token_ids for c in out.chunks if c.request_id == "a" and c.sample]
        sched.update_from_output(out, fake_run(sched, out))
    assert not sched.has_work()
    assert sched.num_preemptions > 0
    assert sent[0] == []
    resent = [tokens for tokens in sent[1:] if tokens is not None]
    assert resent and all(len(tokens) > 0 and PLACEHOLDER_TOKEN not in tokens for tokens in resent)
    assert_nothing_leaked(sched)


def test_runner_logprobs_reach_the_deltas() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("lp", [1, 2, 3], max_tokens=2, logprobs=1))
    sched.add_request(make_request("no", [4, 5, 6], max_tokens=2))
    entry = [-0.5, [[11, -0.5]]]
    collected: dict[str, list] = {"lp": [], "no": []}
    while sched.has_work():
        out = sched.schedule()
        result = fake_run(sched, out)
        # As the runner reports them: one entry per chunk, None where it did not ask.
        result.logprobs = [entry if c.request_id == "lp" else None for c in out.chunks]
        for delta in sched.update_from_output(out, result):
            collected[delta.request_id].append(delta.logprobs)
    assert collected["lp"] == [[entry], [entry]]
    assert collected["no"] == [None, None]
    assert_nothing_leaked(sched)


def test_no_logprobs_from_the_runner_means_none_in_deltas() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("r", [1, 2], max_tokens=1))
    out = sched.schedule()
    (delta,) = sched.update_from_output(out, fake_run(sched, out))
    assert delta.logprobs is None
    assert_nothing_leaked(sched)


def test_prefill_role_first_token_carries_logprobs() -> None:
    sched = make_scheduler(role=Role.PREFILL)
    request = Request("p", [1, 2, 3], SamplingParams(max_tokens=4, logprobs=0))
    assert sched.reserve_prefill(request)
    sched.add_request(request)
    out = sched.schedule()
    result = fake_run(sched, out)
    result.logprobs = [[-1.25, []]]
    (delta,) = sched.update_from_output(out, result)
    assert delta.logprobs == [[-1.25, []]] and delta.first_index == 0
    sched.release_sent("p", RequestStatus.FINISHED_STOPPED)
    assert_nothing_leaked(sched)
