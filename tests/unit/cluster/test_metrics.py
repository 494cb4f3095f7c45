"""Prometheus exposition of router observations and instance stats."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import BucketHistogram, RequestRecord, RouterMetrics


def samples(text: bytes) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_request_records_feed_latency_histograms() -> None:
    metrics = RouterMetrics()
    metrics.observe(
        RequestRecord(
            "stop",
            10,
            5,
            arrival=100.0,
            first_token=100.2,
            finished=101.0,
            token_gaps=[0.2, 0.2, 0.2, 0.2],
            phases={"prefill": 0.15, "transfer": 0.01},
        )
    )
    metrics.observe(RequestRecord("timeout", 7, 0, arrival=0.0))
    got = samples(metrics.render([], inflight=3))
    assert got[("pdserve_requests_total", (("outcome", "stop"),))] == 1
    assert got[("pdserve_requests_total", (("outcome", "timeout"),))] == 1
    assert got[("pdserve_prompt_tokens_total", ())] == 17
    assert got[("pdserve_time_to_first_token_seconds_count", ())] == 1
    assert abs(got[("pdserve_time_to_first_token_seconds_sum", ())] - 0.2) < 1e-9
    assert abs(got[("pdserve_time_per_output_token_seconds_sum", ())] - 0.2) < 1e-9
    assert got[("pdserve_inter_token_latency_seconds_count", ())] == 4
    assert got[("pdserve_ttft_phase_seconds_count", (("phase", "transfer"),))] == 1
    assert got[("pdserve_router_inflight_requests", ())] == 3


def test_instance_stats_become_labelled_series() -> None:
    hist = BucketHistogram()
    for value in (0.002, 0.004, 30.0):
        hist.observe(value)
    stats = [
        {
            "name": "prefill-0",
            "role": "prefill",
            "running": 2,
            "waiting": 1,
            "num_blocks": 100,
            "free_blocks": 60,
            "prepare_queue": 4,
            "counters": {"transfers_ok": 9},
            "transfer_seconds": hist.to_dict(),
        },
        {
            "name": "decode-0",
            "role": "decode",
            "running": 5,
            "waiting_for_kv": 1,
            "num_blocks": 50,
            "free_blocks": 50,
            "counters": {},
        },
        {"name": "decode-1", "error": "ActorDiedError"},
    ]
    got = samples(RouterMetrics().render(stats, inflight=0))
    p = (("instance", "prefill-0"), ("role", "prefill"))
    assert got[("pdserve_instance_kv_blocks_used", p)] == 40
    assert got[("pdserve_instance_prepare_queue", p)] == 4
    assert got[("pdserve_instance_running", (("instance", "decode-0"), ("role", "decode")))] == 5
    assert got[("pdserve_instance_events_total", (("event", "transfers_ok"), *p))] == 9
    assert got[("pdserve_kv_transfer_seconds_count", (("instance", "prefill-0"),))] == 3
    assert (
        got[("pdserve_kv_transfer_seconds_bucket", (("instance", "prefill-0"), ("le", "0.005")))]
        == 2
    )
    assert not any(labels and ("instance", "decode-1") in labels for _, labels in got)
