"""Scheduler.switch_role: an empty scheduler serves another role from its next step on."""

from __future__ import annotations

import pytest

from engine.config import Role, SchedulerConfig
from engine.request import RequestStatus
from tests.unit.engine.helpers import make_request, make_scheduler, run_to_completion


def test_a_prefill_scheduler_becomes_a_decode_scheduler_and_back() -> None:
    sched = make_scheduler(role=Role.PREFILL)
    request = make_request("p", list(range(10)))
    assert sched.reserve_prefill(request)
    sched.add_request(request)
    run_to_completion(sched)  # the first token: the request waits as SENDING_KV
    with pytest.raises(RuntimeError, match="1 requests are still here"):
        sched.switch_role(Role.DECODE, SchedulerConfig(block_size=4, max_num_seqs=8))
    sched.release_sent("p", RequestStatus.FINISHED_STOPPED)

    sched.switch_role(Role.DECODE, SchedulerConfig(block_size=4, max_num_seqs=8))
    assert (sched.role, sched.config.max_num_seqs) == (Role.DECODE, 8)
    remote = make_request("d", list(range(10)), max_tokens=3)
    assert sched.reserve_remote(remote)
    sched.start_remote("d", 7)
    assert len(run_to_completion(sched)["d"]) == 2  # the first token came with the KV
    assert not sched.requests and sched.block_manager.num_free_blocks == 64

    sched.switch_role(Role.MIXED, SchedulerConfig(block_size=4))
    sched.add_request(make_request("m", list(range(5)), max_tokens=2))
    assert len(run_to_completion(sched)["m"]) == 2
    sched.check_invariants()


def test_the_block_size_cannot_change() -> None:
    sched = make_scheduler(role=Role.DECODE, block_size=4)
    with pytest.raises(ValueError, match="block size 16"):
        sched.switch_role(Role.PREFILL, SchedulerConfig(block_size=16))
