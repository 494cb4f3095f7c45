"""The elastic controller on a live deployment: it reads the router's SLO attainment and the
instances' stats, decides, logs and counts (in its stats, /metrics and `pdserve status`), and
carries the switch out (tests/integration/test_role_switch.py tests switches under load)."""

from __future__ import annotations

import httpx
import pytest
import ray

from cluster.cli_status import collect, render
from tests.integration.harness import prompts, run_load, small_config, start, wait_until


@pytest.fixture(scope="module")
def deployment(default_model_path):
    # 2P1D with a TPOT bound no CPU run meets (and a TTFT bound every run meets): decode
    # counts as short, and one of the two prefill instances can be spared for it.
    config = small_config(
        prefill={"instances": 2},
        slo={"ttft_ms": 600_000, "tpot_ms": 1, "window_s": 600},
        elastic={"enabled": True, "decision_interval_s": 0.5, "hysteresis": 1},
    )
    dep = start(config)
    yield dep
    dep.stop()


def test_the_controller_decides_from_live_figures(deployment) -> None:
    run_load(deployment.url, prompts(4), 8)
    controller = deployment.controller

    def carried_out() -> bool:
        decisions = ray.get(controller.stats.remote(), timeout=10)["decisions"]
        return bool(decisions) and decisions[0]["outcome"] != "pending"

    wait_until(carried_out, timeout_s=120)
    stats = ray.get(controller.stats.remote(), timeout=10)
    record = stats["decisions"][0]
    assert (record["kind"], record["from_role"], record["to_role"]) == (
        "switch",
        "prefill",
        "decode",
    )
    assert "decode is short" in record["reason"] and "TPOT attainment" in record["reason"]
    assert record["outcome"] == "done", record
    assert stats["counters"]["decided_switch_prefill_to_decode"] >= 1
    assert stats["counters"]["switch_done"] >= 1
    switched = ray.get(ray.get_actor(record["instance"]).stats.remote(), timeout=10)
    assert switched["role"] == "decode"

    metrics = httpx.get(f"{deployment.url}/metrics", timeout=30).text
    assert 'instance="elastic-controller"' in metrics
    assert 'event="decided_switch_prefill_to_decode"' in metrics

    router, instances = collect(deployment.config.cluster.namespace, 10.0)
    text = render(router, instances)
    assert "elastic controller: on" in text and "switch prefill-" in text
