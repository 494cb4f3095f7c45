"""A tensor-parallel mixed instance on Ray: the default model (9 query / 3 KV heads) at TP 3,
three rank actors in one placement group joined by gloo, serves the test prompts exactly as the
single-process engine does, and frees every block; a rank that dies ends the instance, which Ray
restarts with new ranks."""

from __future__ import annotations

import pytest
import ray

from tests.integration.conftest import MAX_TOKENS
from tests.integration.harness import (
    assert_all_free,
    failures_in,
    prompts,
    run_load,
    small_config,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)
TP = 3


@pytest.fixture(scope="module")
def dep():
    config = small_config(
        prefill={"instances": 0},
        decode={"instances": 0},
        mixed={
            "instances": 1,
            "engine": {"tensor_parallel_size": TP, "cache": {"memory_mb": 32}},
            "placement": {"num_cpus": 0.5},
        },
    )
    deployment = start(config)
    yield deployment
    deployment.stop()


def test_tp_mixed_instance_matches_single_engine(dep, reference_outputs) -> None:
    prompt_list = prompts()
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    for prompt, text in zip(prompt_list, texts, strict=True):
        assert text == reference_outputs[prompt], prompt
    stats = assert_all_free(dep)
    assert not failures_in(stats)
    ranks = [ray.get_actor(f"mixed-0-rank-{r}", namespace="pdserve") for r in range(1, TP)]
    assert len(ranks) == TP - 1  # rank 0 is the instance actor itself


def test_a_dead_rank_restarts_the_instance(dep, reference_outputs) -> None:
    pid = dep.stats()["mixed-0"]["pid"]
    ray.kill(ray.get_actor("mixed-0-rank-2", namespace="pdserve"), no_restart=True)
    # The instance's watchdog sees the rank gone and ends the instance's process; Ray restarts
    # it (with new ranks) and the supervisor re-wires it.
    wait_until(lambda: "mixed-0" in dep.supervisor.recoveries, timeout_s=300)
    prompt_list = prompts()[:6]
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    assert texts == [reference_outputs[p] for p in prompt_list]
    assert dep.stats()["mixed-0"]["pid"] != pid
    assert_all_free(dep)
