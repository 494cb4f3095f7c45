"""Stats dicts -> the policy's snapshot."""

from __future__ import annotations

import pytest

from cluster.elastic.snapshot import SnapshotBuilder
from engine.config import Role


def test_stats_become_views() -> None:
    builder = SnapshotBuilder()
    prefill = {
        "name": "p0",
        "role": "prefill",
        "running": 1,
        "waiting": 2,
        "prepare_queue": 3,
        "backlog_tokens": 5000,
        "num_blocks": 100,
        "free_blocks": 75,
        "busy_s": 10.0,
    }
    decode = {
        "name": "d0",
        "role": "decode",
        "running": 30,
        "waiting_for_kv": 2,
        "num_blocks": 200,
        "free_blocks": 50,
        "max_num_seqs": 64,
    }
    dead = {"name": "d1", "error": "RayActorError"}
    router = {"slo": {"finished": 9, "ttft_attainment": 0.5, "tpot_attainment": 0.75}}
    snap = builder.build(1.0, router, [prefill, decode, dead], unavailable={"d0"})
    p, d = snap.instances
    assert (p.role, p.waiting, p.backlog_tokens, p.kv_usage, p.busy) == (
        Role.PREFILL,
        5,
        5000,
        0.25,
        0.0,
    )  # no busy fraction from one look
    assert (d.role, d.waiting, d.kv_usage, d.available) == (Role.DECODE, 2, 0.75, False)
    assert d.load == pytest.approx(0.75) and snap.slo.ttft_attainment == 0.5
    later = builder.build(3.0, router, [{**prefill, "busy_s": 11.5}])
    assert later.instances[0].busy == pytest.approx(0.75)
    restarted = builder.build(4.0, None, [{**prefill, "busy_s": 0.2}])
    assert restarted.instances[0].busy == 0.0 and restarted.slo.finished == 0
