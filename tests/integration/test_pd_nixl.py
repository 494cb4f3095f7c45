"""1P1D over NIXL on local Ray: identical greedy output, nothing leaked, disconnects and a
stalled decode instance handled."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
import ray

from cluster.launcher import Deployment, _start_router
from engine.errors import DeployError
from tests.integration.conftest import MAX_TOKENS
from tests.integration.harness import (
    assert_all_free,
    failures_in,
    model_id,
    prompts,
    run_load,
    small_config,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dep():
    deployment = start(small_config())
    yield deployment
    deployment.stop()


def test_sixteen_concurrent_requests_match_single_engine(dep, reference_outputs) -> None:
    prompt_list = prompts()
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    for prompt, text in zip(prompt_list, texts, strict=True):
        assert text == reference_outputs[prompt], prompt
    stats = assert_all_free(dep)
    # Every request whose first token was not EOS moved its KV to D.
    moved = sum(1 for text in texts if text)
    counters = stats["prefill-0"]["counters"]
    assert counters["transfers_ok"] >= moved > 8
    # A first token of EOS finishes on P: D's reservation is cancelled, which is no failure.
    assert counters.get("transfers_cancelled", 0) == len(texts) - moved
    assert not failures_in(stats), failures_in(stats)
    assert stats["messager-0"]["counters"]["writes"] > 0


def test_idle_deployment_uses_almost_no_cpu(dep) -> None:
    # After serving (so the messager's UCX endpoints to D are up), with nothing in flight, every
    # instance and messager process sleeps: NIXL's progress threads wait on UCX's event fds.
    import psutil

    stats = assert_all_free(dep)
    processes = {n: psutil.Process(entry["pid"]) for n, entry in stats.items() if "pid" in entry}
    assert {"prefill-0", "decode-0", "messager-0"} <= set(processes)
    before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    window_s = 10.0
    time.sleep(window_s)
    cores = {
        name: (sum(p.cpu_times()[:2]) - before[name]) / window_s for name, p in processes.items()
    }
    assert all(share < 0.05 for share in cores.values()), cores


def test_streaming_client_disconnect_frees_blocks_on_p_and_d(dep) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=dep.url, timeout=60) as client:
            body = {
                "model": await model_id(client),
                "prompt": prompts()[0],
                "max_tokens": 400,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", "/v1/completions", json=body) as response:
                chunks = 0
                async for line in response.aiter_lines():
                    chunks += line.startswith("data: ")
                    if chunks >= 3:
                        break  # leaving the block closes the connection mid-stream

    asyncio.run(main())
    assert_all_free(dep)


def test_stalled_decode_gives_clear_error_then_late_answer_is_cancelled(dep) -> None:
    decode_pid = dep.stats()["decode-0"]["pid"]
    os.kill(decode_pid, signal.SIGSTOP)
    try:
        start_time = time.monotonic()
        response = httpx.post(
            f"{dep.url}/v1/completions",
            json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4},
            timeout=60,
        )
        elapsed = time.monotonic() - start_time
    finally:
        os.kill(decode_pid, signal.SIGCONT)
    assert response.status_code == 503, response.text  # a capacity problem: retry later
    assert "decode instance" in response.json()["error"]["message"]
    assert elapsed < 30  # one allocation timeout (2 s), not a hang
    # The stalled D wakes up and allocates for the request; P cancels that late allocation.
    wait_until(lambda: dep.stats()["prefill-0"]["counters"].get("late_allocations", 0) >= 1)
    assert_all_free(dep)


def test_official_openai_client_streamed_and_not(dep) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{dep.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model=model, messages=question, max_tokens=24, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model, messages=question, max_tokens=24, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == reply.choices[0].message.content
    assert httpx.get(f"{dep.url}/health").status_code == 200
    assert_all_free(dep)


def test_pdserve_status_lists_every_instance(dep) -> None:
    import subprocess
    import sys

    import ray

    address = ray.get_runtime_context().gcs_address
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("prefill-0", "decode-0", "messager-0", dep.url):
        assert name in result.stdout
    assert "/" in result.stdout.split("prefill-0", 1)[1].splitlines()[0]  # KV used/total


def test_router_without_room_on_the_driver_node_fails_start_up_clearly(dep) -> None:
    # The cluster of `dep` is running; this router asks for more CPUs than the node has, and
    # router.placement driver_node (the default) forbids Ray to put it elsewhere.
    cluster = {"startup_timeout_s": 2, "namespace": "router-placement-test"}
    config = small_config(router={"num_cpus": 10_000}, cluster=cluster)
    # The live deployment's instances: the router only reads their endpoints and handles.
    failed = Deployment(config, endpoints=dep.endpoints)
    try:
        with pytest.raises(DeployError, match=r"router\.num_cpus \(10000\).*driver_node"):
            _start_router(failed)
    finally:
        failed.stop(timeout_s=5)
    left = ray.util.list_named_actors(all_namespaces=True)
    assert not [a for a in left if a["namespace"] == "router-placement-test"], left
    # The deployment under test still serves.
    assert httpx.get(f"{dep.url}/health", timeout=10).status_code == 200


def test_router_port_taken_after_the_preflight_check_fails_in_one_line(dep) -> None:
    import socket

    from cluster.preflight import one_line

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = small_config(router={"port": port}, cluster={"namespace": "router-port-test"})
        failed = Deployment(config, endpoints=dep.endpoints)
        try:
            with pytest.raises(Exception) as info:  # Ray wraps the DeployError
                _start_router(failed)
        finally:
            failed.stop(timeout_s=5)
    line = one_line(info.value)
    assert line is not None, info.value
    assert f"router.port {port}: 127.0.0.1:{port} is already in use" in line, line


def test_prometheus_metrics_aggregate_router_and_instances(dep) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    run_load(dep.url, prompts()[:4], 8)
    text = httpx.get(f"{dep.url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("pdserve_time_to_first_token_seconds_count", ())] >= 4
    assert samples[("pdserve_inter_token_latency_seconds_count", ())] > 0
    assert samples[("pdserve_requests_total", (("outcome", "length"),))] >= 1
    phase = ("pdserve_ttft_phase_seconds_count", (("phase", "transfer"),))
    assert samples[phase] >= 1
    # The messager's stamps split the transfer into three parts that add up to it.
    parts = ("transfer_signals", "transfer_writes", "transfer_notify")
    for part in parts:
        assert samples[("pdserve_ttft_phase_seconds_count", (("phase", part),))] == samples[phase]
    parts_s = sum(samples[("pdserve_ttft_phase_seconds_sum", (("phase", p),))] for p in parts)
    transfer_s = samples[("pdserve_ttft_phase_seconds_sum", (("phase", "transfer"),))]
    assert parts_s == pytest.approx(transfer_s, abs=1e-6)
    assert (
        "pdserve_instance_kv_blocks_used",
        (("instance", "decode-0"), ("role", "decode")),
    ) in samples
    assert samples[("pdserve_kv_transfer_seconds_count", (("instance", "prefill-0"),))] >= 1
    assert any(name == "pdserve_instance_prepare_queue" for name, _ in samples)
