"""Prefill and decode at different tensor-parallel sizes, without Ray: P at TP 2 with D at TP 1,
and P at TP 1 with D at TP 2 (ranks 1.. as local processes joined by gloo, their KV caches in
shared memory that the messager or D maps). The messager gathers each D rank's heads of every
block from the P ranks holding them into its staging ring and writes them whole (the local
backend: copies them from the mapped caches); 16 concurrent requests come out token for token as
one TP-1 engine gives them, and every block on both sides is free after."""

from __future__ import annotations

import random

import pytest

from tests.unit.instances.harness import ENGINE, assert_all_free, pump

pytestmark = pytest.mark.timeout(300)


def _prompts(count: int = 16) -> list[list[int]]:
    rng = random.Random(7)
    # some longer than one prefill chunk (64 tokens), so chunks stream layer by layer
    return [[rng.randrange(4, 256) for _ in range(rng.choice((5, 30, 90)))] for _ in range(count)]


# Each size pair through one backend: TCP (a socket, as between machines), and local (the
# messager maps D's shared caches and copies); both pairs on both are in test_tp_layout.py.
@pytest.mark.parametrize(("p_size", "d_size", "backend"), [(2, 1, "tcp"), (1, 2, "local")])
def test_sixteen_requests_match_tp1_and_free_every_block(
    pd, offline, p_size, d_size, backend
) -> None:
    engine = {**ENGINE, "cache": {"num_blocks": 512}}
    # One thread pumps every loop, and a TP step takes a while on a loaded machine: generous
    # deadlines, so D's late answer or a late cache task is not mistaken for a stalled peer.
    cluster, router = pd(
        prefill={"engine": {**engine, "tensor_parallel_size": p_size}, "allocation_timeout_s": 30},
        decode={"engine": {**engine, "tensor_parallel_size": d_size}},
        transfer={"backend": backend, "cache_task_timeout_s": 30},
    )
    (decode,) = cluster.decodes
    assert len(cluster.prefill.policy.info()["kv_cache"]) == p_size  # what the messager maps
    assert len(decode.policy.info()["transfer"]["ranks"]) == d_size  # what P's messager writes
    prompts = _prompts()
    for i, prompt in enumerate(prompts):
        router.send(cluster.prefill, f"r{i}", prompt, max_tokens=8)
    pump(
        *cluster.loops,
        router=router,
        until=lambda: all(router.finish(f"r{i}") for i in range(len(prompts))),
        timeout_s=240,
    )
    for i, prompt in enumerate(prompts):
        assert router.finish(f"r{i}").finish_reason == "length", router.finish(f"r{i}")
        assert router.tokens(f"r{i}") == offline(prompt, 8), i
    pump(*cluster.loops, until=lambda: not cluster.prefill.policy.transfers, timeout_s=30)
    for loop in cluster.loops:
        assert_all_free(loop)
    assert decode.counters["kv_complete"] == len(prompts)
    stats = cluster.messager.stats()
    assert stats["counters"]["writes"] > 0
    assert stats["transfer"]["staged_writes"] == stats["counters"]["writes"]  # no per-token path
