"""The scheduler under the overlap schedule: step N is scheduled (and 'run') before step N-1's
tokens are read back; outputs must equal sequential mode and nothing may leak."""

from __future__ import annotations

import pytest

from engine.batch import PLACEHOLDER_TOKEN, ModelRunnerOutput, SchedulerOutput
from engine.scheduler import Scheduler
from tests.unit.engine.helpers import (
    assert_nothing_leaked,
    expected_tokens,
    make_request,
    make_scheduler,
    next_token_rule,
)


def run_step(sched: Scheduler, out: SchedulerOutput, last: dict[str, int]) -> ModelRunnerOutput:
    """A fake device: placeholders take the token this request sampled in the previous step."""
    sampled: list[int | None] = []
    for chunk in out.chunks:
        request = sched.requests[chunk.request_id]
        tokens = [last[chunk.request_id] if t == PLACEHOLDER_TOKEN else t for t in chunk.token_ids]
        sequence = request.all_token_ids[: chunk.start_pos] + tokens
        token = next_token_rule(sequence) if chunk.sample else None
        if token is not None:
            last[chunk.request_id] = token
        sampled.append(token)
    return ModelRunnerOutput(out.step_id, [c.request_id for c in out.chunks], sampled)


def run_overlapped(sched: Scheduler) -> tuple[dict[str, list[int]], int]:
    outputs: dict[str, list[int]] = {}
    last: dict[str, int] = {}
    in_flight = None
    placeholders = 0
    for _ in range(10_000):
        out = sched.schedule()  # before the step in flight is read back
        placeholders += sum(PLACEHOLDER_TOKEN in c.token_ids for c in out.chunks)
        result = run_step(sched, out, last) if not out.is_empty else None
        if in_flight is not None:
            for delta in sched.update_from_output(*in_flight):
                outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        sched.check_invariants()
        in_flight = (out, result) if result is not None else None
        if in_flight is None and not sched.has_work():
            return outputs, placeholders
    raise AssertionError("did not finish")


@pytest.mark.parametrize("num_blocks", [64, 10], ids=["roomy", "preempting"])
def test_overlap_matches_sequential(num_blocks: int) -> None:
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=16)
    prompts = {f"r{i}": [i + 2] * (3 + 5 * i) for i in range(4)}
    for rid, prompt in prompts.items():
        sched.add_request(make_request(rid, prompt, max_tokens=9))
    outputs, placeholders = run_overlapped(sched)
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected_tokens(prompt, 9)
    assert placeholders > 0  # decode steps really ran ahead of the read-back
    assert_nothing_leaked(sched)


def test_request_finishing_in_flight_drops_its_extra_token() -> None:
    sched = make_scheduler()
    prompt = [5, 6, 7]
    want = expected_tokens(prompt, 4)
    req = make_request("eos", prompt, max_tokens=50)
    req.eos_token_ids = (want[2],)  # finishes on its third token
    sched.add_request(req)
    outputs, _ = run_overlapped(sched)
    assert outputs["eos"] == want[:3]
    assert_nothing_leaked(sched)


def test_max_tokens_known_in_advance_schedules_no_extra_step() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("n", [1, 2, 3], max_tokens=3))
    steps = 0
    last: dict[str, int] = {}
    in_flight = None
    while sched.has_work() or in_flight:
        out = sched.schedule()
        steps += not out.is_empty
        result = run_step(sched, out, last) if not out.is_empty else None
        if in_flight:
            sched.update_from_output(*in_flight)
        in_flight = (out, result) if result is not None else None
    assert steps == 3  # prefill + 2 decodes: never a 4th step for a token past max_tokens
    assert_nothing_leaked(sched)


def test_generated_blocks_are_cached_as_in_sequential_mode() -> None:
    """A block filled by decoding is hashed only once all its tokens are known, so a second
    turn (prompt + answer + more) hits the cache as far under overlap as sequentially."""
    from engine.block_manager import block_hashes

    prompt = [7] * 7
    hits = []
    for overlapped in (False, True):
        sched = make_scheduler(block_size=4, enable_prefix_caching=True)
        sched.add_request(make_request("turn1", prompt, max_tokens=9))
        if overlapped:
            outputs, _ = run_overlapped(sched)
        else:
            from tests.unit.engine.helpers import run_to_completion

            outputs = run_to_completion(sched)
        answer = outputs["turn1"]
        follow_up = prompt + answer + [9, 9, 9]
        cached = sched.block_manager.match_prefix(follow_up)
        # Every full block of prompt + answer but the one holding the last, never-computed token.
        assert len(cached) == (len(prompt) + len(answer) - 1) // 4
        assert len(block_hashes(follow_up, 4)) > len(cached)
        hits.append(len(cached))
    assert hits[0] == hits[1]
