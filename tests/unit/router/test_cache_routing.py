"""The router's routing state: config to policy, reports to choices, choices to metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster.config import RouterConfig, parse_config
from cluster.metrics import RouterMetrics
from cluster.router.cache_routing import InstanceChooser
from cluster.router.prefix_index import request_block_keys
from engine.config import Role
from engine.protocol.cache_events import PrefixCacheEvents

BS = 16


def _samples(metrics: RouterMetrics, stats: list[dict] | None = None) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render(stats or [], 0).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _report(name: str, keys: list, seq: int = 0, free_blocks: int = 100) -> PrefixCacheEvents:
    return PrefixCacheEvents(name, "i", seq, BS, 1000, free_blocks, stored=keys)


def test_routing_defaults_to_cache_aware_and_parses() -> None:
    assert parse_config({"mixed": {"instances": 1}}).router.routing.value == "cache_aware"
    config = parse_config({"mixed": {"instances": 1}, "router": {"routing": "load"}})
    assert not InstanceChooser(config.router, RouterMetrics()).policy.cache_aware


def test_prefill_choice_follows_reports_and_counts_reasons() -> None:
    metrics = RouterMetrics()
    chooser = InstanceChooser(RouterConfig(), metrics)
    prompt = list(range(1000, 1000 + 10 * BS))
    candidates = [("p0", Role.PREFILL), ("p1", Role.PREFILL)]
    outstanding = {"p0": 0, "p1": 100}
    assert chooser.choose_prefill(candidates, outstanding, prompt).name == "p0"
    chooser.on_report(_report("p1", request_block_keys(prompt, BS)))
    decision = chooser.choose_prefill(candidates, outstanding, prompt)
    # All 10 blocks are cached, but a prefill computes at least the last token: 9 blocks.
    assert (decision.name, decision.reason, decision.cached_tokens) == ("p1", "cache_hit", 9 * BS)
    chooser.instance_down("p1")
    assert chooser.choose_prefill(candidates, outstanding, prompt).name == "p0"
    got = _samples(metrics)
    key = "pdserve_routing_decisions_total"
    assert got[(key, (("reason", "load"), ("role", "prefill")))] == 2
    assert got[(key, (("reason", "cache_hit"), ("role", "prefill")))] == 1


def test_decode_preference_and_inflight_counts() -> None:
    chooser = InstanceChooser(RouterConfig(), RouterMetrics())
    prompt = list(range(5 * BS))
    assert chooser.choose_decode(["d0", "d1"], prompt) is None  # nothing reported yet
    chooser.on_report(_report("d0", []))
    chooser.on_report(_report("d1", request_block_keys(prompt, BS)[:3]))
    decision = chooser.choose_decode(["d0", "d1"], prompt)
    assert (decision.name, decision.cached_tokens) == ("d1", 3 * BS)
    assert chooser.stats()["decode_inflight"] == {"d1": 1}
    chooser.request_ended("d1", {})
    assert chooser.stats()["decode_inflight"] == {}


def test_a_decode_instance_that_has_not_reported_is_chosen_by_load() -> None:
    chooser = InstanceChooser(RouterConfig(), RouterMetrics())
    prompt = list(range(5 * BS))
    chooser.on_report(_report("d0", []))
    assert chooser.choose_decode(["d0"], prompt).name == "d0"  # one in flight there now
    # d2 was just added (or switched to decode): it never served this router, so never
    # reported; it holds nothing and is the least loaded.
    decision = chooser.choose_decode(["d0", "d2"], prompt)
    assert (decision.name, decision.reason) == ("d2", "load")
    chooser.on_report(_report("d0", request_block_keys(prompt, BS)[:3], seq=1))
    assert chooser.choose_decode(["d0", "d2"], prompt).name == "d0"  # a holder still wins


def test_hit_tokens_and_kv_bytes_are_exported() -> None:
    metrics = RouterMetrics()
    chooser = InstanceChooser(RouterConfig(), metrics)
    chooser.observe_prefix_hits(Role.PREFILL, 64)
    chooser.observe_prefix_hits(Role.DECODE, 32)
    stats = [
        {
            "name": "prefill-0",
            "role": "prefill",
            "counters": {"transfer_bytes": 4096, "transfer_bytes_skipped": 1024},
        }
    ]
    got = _samples(metrics, stats)
    assert got[("pdserve_prefix_cache_hit_tokens_total", (("role", "prefill"),))] == 64
    assert got[("pdserve_prefix_cache_hit_tokens_total", (("role", "decode"),))] == 32
    moved = ("instance", "prefill-0"), ("kind", "moved")
    skipped = ("instance", "prefill-0"), ("kind", "skipped")
    assert got[("pdserve_kv_transfer_bytes_total", moved)] == 4096
    assert got[("pdserve_kv_transfer_bytes_total", skipped)] == 1024
