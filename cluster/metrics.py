"""Prometheus metrics of a whole deployment, served by the router at /metrics.

Request-level series (TTFT, TPOT, ITL, end-to-end latency, the server-side TTFT split, requests
by outcome) are observed by the router itself. Instance-level series (running and waiting
requests, KV blocks, prepare-pool depth, KV transfers) come from each instance's `stats()`,
fetched at scrape time and rendered by a custom collector, so instances need no HTTP server.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BucketHistogram:
    """A cumulative-bucket histogram an instance keeps in plain data (sent through stats()).
    Observed and read by the instance's loop only (stats() runs on the loop), so no lock."""

    def __init__(self, buckets: tuple[float, ...] = TRANSFER_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def to_dict(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}


@dataclass
class RequestRecord:
    """One finished request as the router saw it (monotonic seconds)."""

    outcome: str  # stop | length | abort | error | timeout
    prompt_tokens: int
    output_tokens: int
    arrival: float
    first_token: float | None = None
    finished: float = 0.0
    token_gaps: list[float] = field(default_factory=list)  # between consecutive token arrivals
    phases: dict[str, float] = field(default_factory=dict)  # server-side TTFT split


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdserve_requests", "Finished requests", ["outcome"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Output tokens", registry=r)
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "TTFT at the router",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "(e2e - TTFT) / (output tokens - 1)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Gap between consecutive tokens",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_phase = Histogram(
            "pdserve_ttft_phase_seconds",
            "Server-side split of TTFT: prepare, prefill_queue, prefill, transfer, "
            "first_decode_step",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("pdserve_router_inflight_requests", "Requests in flight", registry=r)
        self.routing_decisions = Counter(
            "pdserve_routing_decisions",
            "Instance choices by role and reason (load, cache_hit, balance_guard)",
            ["role", "reason"],
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "pdserve_prefix_cache_hit_tokens",
            "Prompt tokens served from an instance's prefix cache, by the instance's role",
            ["role"],
            registry=r,
        )
        self._instances = InstanceCollector()
        r.register(self._instances)

    def observe(self, record: RequestRecord) -> None:
        self.requests.labels(record.outcome).inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.output_tokens)
        for phase, seconds in record.phases.items():
            self.ttft_phase.labels(phase).observe(max(seconds, 0.0))
        if record.first_token is None:
            return
        ttft = record.first_token - record.arrival
        self.ttft.observe(ttft)
        self.e2e.observe(record.finished - record.arrival)
        if record.output_tokens > 1:
            self.tpot.observe((record.finished - record.first_token) / (record.output_tokens - 1))
        for gap in record.token_gaps:
            self.itl.observe(gap)

    def render(self, instance_stats: list[dict], inflight: int) -> bytes:
        """The exposition text, with instance series from `instance_stats` (just fetched)."""
        self.inflight.set(inflight)
        self._instances.stats = instance_stats
        return generate_latest(self.registry)


_GAUGES = {
    "running": "Requests in the running batch",
    "waiting": "Requests waiting to be scheduled",
    "waiting_for_kv": "Decode requests whose KV is still arriving",
    "sending_kv": "Prefill requests whose KV is being sent",
    "prepare_queue": "Requests in the prefill prepare pool",
    "num_blocks": "KV blocks in the cache",
}


class InstanceCollector(Collector):
    """Renders the instance stats fetched for this scrape."""

    def __init__(self) -> None:
        self.stats: list[dict] = []

    def collect(self) -> Iterable:
        stats = [s for s in self.stats if "error" not in s]
        labels = ["instance", "role"]
        for key, doc in _GAUGES.items():
            family = GaugeMetricFamily(f"pdserve_instance_{key}", doc, labels=labels)
            for s in stats:
                if key in s:
                    family.add_metric([s["name"], s.get("role", "messager")], s[key])
            yield family
        yield _kv_used(stats)
        yield _events(stats)
        yield _kv_bytes(stats)
        yield from _transfer_latency(stats)


def _kv_used(stats: list[dict]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "pdserve_instance_kv_blocks_used", "KV blocks in use", labels=["instance", "role"]
    )
    for s in stats:
        if "num_blocks" in s:
            family.add_metric([s["name"], s["role"]], s["num_blocks"] - s["free_blocks"])
    return family


def _events(stats: list[dict]) -> CounterMetricFamily:
    """Every instance counter (requests, transfers_ok, transfer_bytes, leases_expired, ...)."""
    family = CounterMetricFamily(
        "pdserve_instance_events", "Instance event counters", labels=["instance", "role", "event"]
    )
    for s in stats:
        for event, value in s.get("counters", {}).items():
            family.add_metric([s["name"], s.get("role", "messager"), event], value)
    return family


def _kv_bytes(stats: list[dict]) -> CounterMetricFamily:
    """KV bytes a prefill instance had moved to decode instances, and those it did not have to
    move because the decode instance already held the blocks."""
    family = CounterMetricFamily(
        "pdserve_kv_transfer_bytes",
        "KV bytes moved P -> D, or skipped",
        labels=["instance", "kind"],
    )
    for s in stats:
        counters = s.get("counters", {})
        for kind, key in (("moved", "transfer_bytes"), ("skipped", "transfer_bytes_skipped")):
            if key in counters:
                family.add_metric([s["name"], kind], counters[key])
    return family


def _transfer_latency(stats: list[dict]) -> Iterable[HistogramMetricFamily]:
    family = HistogramMetricFamily(
        "pdserve_kv_transfer_seconds",
        "Cache task received by the messager -> every write done",
        labels=["instance"],
    )
    for s in stats:
        hist = s.get("transfer_seconds")
        if not hist:
            continue
        cumulative, buckets = 0, []
        for bound, count in zip([*hist["buckets"], float("inf")], hist["counts"], strict=True):
            cumulative += count
            buckets.append((_le(bound), cumulative))
        family.add_metric([s["name"]], buckets, sum_value=hist["sum"])
    yield family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
