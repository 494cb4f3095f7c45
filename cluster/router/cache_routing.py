"""The router's routing state: the prefix index, the policy, and what it has sent where.

The dispatcher asks `InstanceChooser` for a prefill (or mixed) instance and, in PD mode, a
decode instance to prefer; it feeds it the instances' `PrefixCacheEvents` and tells it when
requests end. It lives on the router's event loop, like the dispatcher, so it needs no lock.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence

from cluster.config import RouterConfig, RoutingMode
from cluster.metrics import RouterMetrics
from cluster.router.prefix_index import KeyChains, PrefixIndex
from cluster.router.routing import (
    BalanceGuard,
    Decision,
    DecodeCandidate,
    PrefillCandidate,
    RoutingPolicy,
    prefill_hit_cap,
)
from engine.config import Role
from engine.protocol.cache_events import PrefixCacheEvents

log = logging.getLogger(__name__)


class InstanceChooser:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        guard = config.cache_routing
        self.index = PrefixIndex(guard.index_max_blocks)
        self.policy = RoutingPolicy(
            config.routing == RoutingMode.CACHE_AWARE,
            prefill_guard=BalanceGuard(guard.max_load_ratio, guard.prefill_slack_tokens),
            decode_guard=BalanceGuard(guard.max_load_ratio, guard.decode_slack_requests),
        )
        self._metrics = metrics
        self._decode_inflight: Counter[Hashable] = Counter()
        self.decisions: Counter[tuple[str, str]] = Counter()  # (role, reason) -> count
        self.hit_tokens: Counter[str] = Counter()  # role -> prefix-cache hit tokens reported

    # ------------------------------------------------------------------ choices
    def choose_prefill(
        self,
        candidates: Sequence[tuple[Hashable, Role]],
        outstanding: dict,
        prompt: list[int],
        cache_salt: str | None = None,
    ) -> Decision:
        """`candidates`: (name, role) of every prefill or mixed instance in service."""
        chains = KeyChains(prompt, cache_salt)
        scored = [
            PrefillCandidate(name, outstanding[name], self._prefill_hit(name, prompt, chains))
            for name, _ in candidates
        ]
        decision = self.policy.choose_prefill(scored, len(prompt))
        self._count(dict(candidates)[decision.name], decision)
        return decision

    def choose_decode(
        self, names: Sequence[Hashable], prompt: list[int], cache_salt: str | None = None
    ) -> Decision | None:
        """The decode instance to prefer for `prompt` (P's own picker decides with load
        routing, when none has reported, or when the preferred one cannot take the request).
        Call `request_ended` with it when the request ends."""
        if not self.policy.cache_aware:
            return None
        known = [(n, c) for n in names if (c := self.index.get(n)) is not None]
        if not known:
            return None
        chains = KeyChains(prompt, cache_salt)
        block_size = known[0][1].block_size
        scored = [
            DecodeCandidate(
                name,
                self._decode_inflight[name],
                cache.free_blocks,
                cache.matched_blocks(chains.for_block_size(cache.block_size)) * cache.block_size,
            )
            for name, cache in known
        ]
        # One that has not reported yet (just added, or switched to decode) holds nothing and
        # has every block free: a candidate by load. Left out, it would never be preferred, and
        # P follows the preference, so it would never serve and so never report.
        roomiest = max(cache.free_blocks for _, cache in known)
        scored += [
            DecodeCandidate(name, self._decode_inflight[name], roomiest, 0)
            for name in names
            if self.index.get(name) is None
        ]
        needed = -(-len(prompt) // block_size)
        decision = self.policy.choose_decode(scored, needed, block_size)
        self._count(Role.DECODE, decision)
        self._decode_inflight[decision.name] += 1
        return decision

    def request_ended(self, decode_hint: Hashable | None, cached_tokens_by: dict) -> None:
        """A request ended: the decode instance preferred for it (if any) has one less, and the
        prefix-cache hits its instances reported count by their role."""
        if decode_hint is not None and self._decode_inflight[decode_hint] > 0:
            self._decode_inflight[decode_hint] -= 1
        for instance, tokens in cached_tokens_by.items():
            self.observe_prefix_hits(instance.role, tokens)

    def _prefill_hit(self, name: Hashable, prompt: list[int], chains: KeyChains) -> int:
        cache = self.index.get(name)
        if cache is None:
            return 0
        hit = self.index.cached_tokens(name, chains)
        return min(hit, prefill_hit_cap(len(prompt), cache.block_size))

    def _count(self, role: Role, decision: Decision) -> None:
        self.decisions[(role.value, decision.reason)] += 1
        self._metrics.routing_decisions.labels(role.value, decision.reason).inc()

    # ------------------------------------------------------------------ events
    def on_report(self, report: PrefixCacheEvents) -> None:
        try:
            self.index.apply(report)
        except TypeError:  # a key that is not hashable: a malformed report
            log.warning("router: dropped a malformed prefix-cache report of %s", report.instance)
            self.index.drop(report.instance)

    def instance_down(self, name: Hashable) -> None:
        self.index.drop(name)
        self._decode_inflight.pop(name, None)

    def observe_prefix_hits(self, role: Role, tokens: int) -> None:
        """Prefix-cache hit tokens an instance reported for a finished request."""
        if tokens > 0:
            self.hit_tokens[role.value] += tokens
            self._metrics.prefix_hit_tokens.labels(role.value).inc(tokens)

    def stats(self) -> dict:
        return {
            "mode": "cache_aware" if self.policy.cache_aware else "load",
            "decisions": {f"{role}/{reason}": n for (role, reason), n in self.decisions.items()},
            "prefix_hit_tokens": dict(self.hit_tokens),
            "decode_inflight": {str(n): c for n, c in self._decode_inflight.items() if c},
            "index": self.index.stats(),
        }
