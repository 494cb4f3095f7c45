"""What the router and the instances report (their stats() dicts) -> the policy's Snapshot.

Keys read from an instance's stats: name, role, running, waiting, waiting_for_kv,
prepare_queue, num_blocks, free_blocks, max_num_seqs, backlog_tokens (prompt tokens queued for
prefill) and busy_s (seconds spent in engine steps so far; busy fraction = its growth over the
wall time between two snapshots). Missing keys count as zero. The router's stats give `slo`
(cluster/elastic/slo_window.py: SloView). An instance whose stats carry an `error` (dead,
stalled) is left out, which is what lets the policy refill a role under its minimum.
"""

from __future__ import annotations

from cluster.elastic.policy import InstanceView, Snapshot
from cluster.elastic.slo_window import SloView
from engine.config import Role


class SnapshotBuilder:
    def __init__(self) -> None:
        self._busy: dict[str, tuple[float, float]] = {}  # name -> (time, busy_s) last seen

    def build(
        self,
        now: float,
        router: dict | None,
        instances: list[dict],
        unavailable: set[str] = frozenset(),
        can_add: bool = False,
        removable: set[str] | None = None,
    ) -> Snapshot:
        views = []
        for stats in instances:
            if "error" in stats or stats.get("role") not in {r.value for r in Role}:
                continue
            views.append(self._view(now, stats, stats["name"] not in unavailable))
        slo = SloView.from_dict(router["slo"]) if router and "slo" in router else SloView()
        kept = frozenset(removable) if removable is not None else None
        return Snapshot(now, tuple(views), slo, can_add, kept)

    def _view(self, now: float, s: dict, available: bool) -> InstanceView:
        name = s["name"]
        num_blocks = s.get("num_blocks", 0)
        return InstanceView(
            name=name,
            role=Role(s["role"]),
            running=s.get("running", 0),
            waiting=s.get("waiting", 0) + s.get("waiting_for_kv", 0) + s.get("prepare_queue", 0),
            backlog_tokens=s.get("backlog_tokens", 0),
            kv_usage=(num_blocks - s.get("free_blocks", 0)) / num_blocks if num_blocks else 0.0,
            busy=self._busy_fraction(name, now, s.get("busy_s")),
            slots=s.get("max_num_seqs", 0),
            available=available,
        )

    def _busy_fraction(self, name: str, now: float, busy_s: float | None) -> float:
        if busy_s is None:
            return 0.0
        last = self._busy.get(name)
        self._busy[name] = (now, busy_s)
        if last is None or now <= last[0] or busy_s < last[1]:  # first look, or a restart
            return 0.0
        return min(1.0, (busy_s - last[1]) / (now - last[0]))
